"""Image conditions: extra U-Net input channels made from a batch (super-resolution, inpainting).

An `ImageCondition` turns a batch's condition images into U-Net keyword arguments: `concat`, channels the U-Net
appends after x_t, and for noise-augmented super-resolution `noise_level`. They join the conditioner's `cond`
dict, so the training loss, the guidance closure and every sampler pass them on unchanged (the seam is the
U-Net call `unet(x_t, t, **cond)`). The U-Net's `in_channels` is the latent channels + `channels(latent)`.

- `SuperResolution`: the low-resolution image, in pixels, resized to the latent size (SR3, Saharia et al. 2021;
  the SD x4 upscaler concatenates low-res pixels to its latents the same way), noise-augmented to a level
  s ~ U{0, …, max_noise_level} of a DDPM schedule in training and a fixed s at sampling (cascaded diffusion,
  Ho et al. 2021, sec. 4.2; SD x4: linear β, max 350, sampling 20); s reaches the U-Net's `noise_level_embed`.
- `Inpainting`: SD-inpainting's layout, cat([x_t, mask ↓ latent size, latent of image · (1 − mask)]).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmlab.data.conditions import masked_image
from ldmlab.diffusion.conditioning import drop_condition
from ldmlab.diffusion.schedules import NoiseSchedule, ddpm_linear

Encode = Callable[[Tensor], Tensor]  # pixels in [-1, 1] → scaled latents
Inputs = dict[str, Tensor]  # U-Net keyword arguments
Size = tuple[int, int]  # (h, w)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, I) drawn where the generator lives (a CPU generator at sampling), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


class ImageCondition(ABC):
    """Extra U-Net inputs from a batch; `p_drop` replaces a training row's channels by zeros (classifier-free
    guidance on the image, Ho & Salimans 2022), which sampling then uses as the unconditional half."""

    keys: ClassVar[tuple[str, ...]]  # the batch entries it reads
    what: ClassVar[str]  # how sample.py gives them
    baseline: ClassVar[str]  # what `picture` is, in reports
    keeps_pixels: ClassVar[bool] = False  # whether some of the truth's pixels are given (`paste` puts them back)

    def __init__(self, p_drop: float = 0.0) -> None:
        if not 0.0 <= p_drop < 1.0:
            raise ValueError(f"model.image_condition.p_drop={p_drop} must be in [0, 1), e.g. 0.0 (no image guidance)")
        self.p_drop = p_drop

    @abstractmethod
    def channels(self, latent_channels: int) -> int:
        """Input channels this condition adds to the U-Net's `latent_channels`."""

    @abstractmethod
    def _inputs(self, batch: dict[str, Any], size: Size, encode: Encode,
                generator: torch.Generator | None, train: bool) -> Inputs:
        """The U-Net keyword arguments of a batch whose latents are (h, w) = `size`."""

    @abstractmethod
    def picture(self, batch: dict[str, Any], size: Size) -> Tensor:
        """The condition as (N, 3, H, W) pixels in [-1, 1] at `size` (grids; the baseline a sample should beat)."""

    def shown(self, batch: dict[str, Any], size: Size) -> Tensor:
        """The condition as the model is given it, as (N, 3, H, W) pixels at `size` (grids); `picture` unless
        that is a processed copy."""
        return self.picture(batch, size)

    def paste(self, batch: dict[str, Any], samples: Tensor) -> Tensor:
        """Samples with the pixels the condition gives put back (none here: the samples as they are)."""
        return samples

    def inputs(self, batch: dict[str, Any], size: Sequence[int], encode: Encode,
               generator: torch.Generator | None = None, train: bool = False) -> Inputs:
        """U-Net keyword arguments for `batch` whose latents are (h, w) = `size` (rows dropped to zeros with p_drop
        when `train`)."""
        if missing := [k for k in self.keys if k not in batch]:
            raise ValueError(f"{type(self).__name__} needs batch entries {list(self.keys)}, missing {missing}: "
                             f"train on its data decoder, or at sampling give {self.what}")
        out = self._inputs(batch, (int(size[0]), int(size[1])), encode, generator, train)
        if train and self.p_drop > 0:
            out["concat"] = drop_condition(out["concat"], torch.zeros(()), self.p_drop, generator)
        return out

    def guided(self, cond: Inputs, uncond: Inputs | None, extra: Inputs) -> tuple[Inputs, Inputs | None]:
        """Add `extra` to the two halves of classifier-free guidance: the unconditional half gets zeros when the
        model learnt them (p_drop > 0), else the same image (guidance then acts on the class or prompt only)."""
        if self.p_drop == 0:
            return cond | extra, None if uncond is None else uncond | extra
        null = {k: torch.zeros_like(v) if k == "concat" else v for k, v in extra.items()}
        return cond | extra, (uncond or {}) | null

    def triptych(self, batch: dict[str, Any], samples: Tensor) -> Tensor:
        """condition | sample | ground truth (when the batch has "image"), side by side: (N, 3, H, 2W or 3W)."""
        parts = [self.picture(batch, (samples.shape[-2], samples.shape[-1])).to(samples), samples]
        return torch.cat(parts + ([batch["image"].to(samples)] if "image" in batch else []), dim=-1)


class SuperResolution(ImageCondition):
    """The low-resolution image upsampled to the latent size and concatenated (3 channels), noise-augmented."""

    keys, what, baseline = ("low_res",), "image=<low-res png>", "bicubic upsampling"

    def __init__(self, factor: int = 4, schedule: NoiseSchedule | None = None, max_noise_level: int = 350,
                 noise_level: int = 20, resize: str = "bicubic", p_drop: float = 0.0) -> None:
        super().__init__(p_drop)
        self.schedule = schedule if schedule is not None else ddpm_linear()  # SD x4's low_res_scheduler
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"model.image_condition.factor={factor} must be a positive integer, e.g. 4")
        if not 0 <= noise_level <= max_noise_level < self.schedule.num_timesteps:
            raise ValueError(f"model.image_condition: need 0 <= noise_level={noise_level} <= max_noise_level="
                             f"{max_noise_level} < {self.schedule.num_timesteps} (the schedule's T), e.g. 20 and 350")
        if resize not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"model.image_condition.resize={resize!r}: valid are bilinear, bicubic, nearest")
        self.factor, self.max_noise_level, self.noise_level, self.resize = factor, max_noise_level, noise_level, resize

    @property
    def augments(self) -> bool:
        """Whether the condition is noise-augmented (and the U-Net gets `noise_level`)."""
        return self.max_noise_level > 0

    def channels(self, latent_channels: int) -> int:
        return 3

    def _resized(self, low: Tensor, size: Size) -> Tensor:
        if tuple(low.shape[-2:]) == size:  # f_VAE = factor (the demo's 16 px → 64 px through an f4 VAE)
            return low
        smooth = {} if self.resize == "nearest" else {"align_corners": False, "antialias": True}
        return F.interpolate(low, size=size, mode=self.resize, **smooth)

    def _inputs(self, batch: dict[str, Any], size: Size, encode: Encode,
                generator: torch.Generator | None, train: bool) -> Inputs:
        low = self._resized(batch["low_res"].float(), size)
        if not self.augments:
            return {"concat": low}
        n, device = low.shape[0], low.device
        if train:  # s ~ U{0, …, max_noise_level}, one per row (cascaded diffusion's truncated conditioning)
            where = generator.device if generator is not None else device
            s = torch.randint(0, self.max_noise_level + 1, (n,), generator=generator, device=where).to(device)
        else:
            s = torch.full((n,), self.noise_level, dtype=torch.long, device=device)
        noisy = self.schedule.add_noise(low, _randn(tuple(low.shape), generator, device), s)  # q(z_s | low), eq. 4
        return {"concat": noisy, "noise_level": s}

    def picture(self, batch: dict[str, Any], size: Size) -> Tensor:
        """The low-res image, bicubic-upsampled: the baseline an SR sample should beat."""
        low = batch["low_res"].float()
        return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)

    def shown(self, batch: dict[str, Any], size: Size) -> Tensor:
        """The low-res image, each pixel repeated (nearest): what the model is given, before any upsampling."""
        return F.interpolate(batch["low_res"].float(), size=size, mode="nearest")


class Inpainting(ImageCondition):
    """SD-inpainting's 1 + C channels: the mask at latent size (nearest, as diffusers) and the masked image's latent."""

    keys, what, baseline = ("image", "mask"), "image=<png> mask=<png>", "masked crop"
    keeps_pixels = True

    def channels(self, latent_channels: int) -> int:
        return 1 + latent_channels

    def _inputs(self, batch: dict[str, Any], size: Size, encode: Encode,
                generator: torch.Generator | None, train: bool) -> Inputs:
        image, mask = batch["image"], batch["mask"].to(batch["image"].dtype)
        latent = encode(masked_image(image, mask))  # (B, C, h, w)
        return {"concat": torch.cat([F.interpolate(mask, size=size), latent.to(image.dtype)], dim=1)}

    def picture(self, batch: dict[str, Any], size: Size) -> Tensor:
        """The masked image (masked pixels grey)."""
        return masked_image(batch["image"], batch["mask"].to(batch["image"].dtype))

    def paste(self, batch: dict[str, Any], samples: Tensor) -> Tensor:
        """samples · mask + image · (1 − mask): the known pixels put back, as an inpainting tool shows its result
        (the model regenerates the whole latent; outside the mask it is only as exact as the VAE)."""
        mask = batch["mask"].to(samples)
        return samples * mask + batch["image"].to(samples) * (1 - mask)
