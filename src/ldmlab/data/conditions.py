"""Image decoders whose batches also carry an image condition: the low-resolution copy of each crop
(super-resolution) or an inpainting mask. `data.decoder._target_` picks one (conf/data/demo_sr.yaml,
conf/data/demo_inpaint.yaml); everything else is `ImageDecoder`'s (crops, flips, buckets, uint8 transport)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.masks import MaskGenerator
from ldmlab.data.transforms import normalize, to_batch

RESAMPLE = {"box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def downsample(pixels: np.ndarray, factor: int, resample: str = "bicubic") -> np.ndarray:
    """(H, W, 3) uint8 → (H/f, W/f, 3) uint8 with PIL's antialiased filter (SR3's bicubic degradation, Saharia
    et al. 2021, sec. 4; "box" is the exact f×f block mean, rounded)."""
    h, w = pixels.shape[:2]
    img = Image.fromarray(pixels).resize((w // factor, h // factor), RESAMPLE[resample])
    return np.asarray(img)


def masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """image · (1 − mask): what SD-inpainting encodes as its condition; masked pixels become 0 (mid-grey in
    [-1, 1]), as diffusers' `init_image * (mask < 0.5)` for a binary mask."""
    return image * (1 - mask)


@dataclass
class LowResDecoder(ImageDecoder):
    """ImageDecoder whose batches also carry "low_res": every crop downsampled by `factor` with `resample`
    ((B, 3, H/f, W/f) in [-1, 1]; uint8 until `on_device`, like "image"), the input of a super-resolution model."""

    factor: int = 4
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"data.decoder.factor={self.factor} must be a positive integer, e.g. 4 (16 px → 64 px)")
        if self.resample not in RESAMPLE:
            raise ValueError(f"data.decoder.resample={self.resample!r} is unknown: valid are {', '.join(RESAMPLE)}")
        sides = [self.image_size] if self.sizes is None else [s for size in self.sizes for s in size]
        if bad := [s for s in sides if s % self.factor]:
            raise ValueError(f"data.decoder.factor={self.factor} does not divide the image side {bad[0]}: set "
                             f"data.decoder.image_size (or the buckets) to a multiple of {self.factor}")

    def collate(self, items: list, rng: random.Random | None = None) -> dict:
        """ImageDecoder's batch plus "low_res" made from the same crops."""
        batch = super().collate(items, rng)
        batch["low_res"] = to_batch([downsample(item[0], self.factor, self.resample) for item in items], self.uint8)
        return batch

    def on_device(self, batch: dict) -> dict:
        """uint8 pixels of "image" and "low_res" → float32 in [-1, 1]."""
        batch = super().on_device(batch)
        if batch["low_res"].dtype == torch.uint8:
            batch["low_res"] = normalize(batch["low_res"])
        return batch


@dataclass
class InpaintDecoder(ImageDecoder):
    """ImageDecoder whose batches also carry "mask" (B, 1, H, W) float32 in {0, 1} (1 = inpaint), drawn from the
    batch's rng by `masks` (a `MaskGenerator` or its arguments), so validation sees the same masks every time."""

    masks: Any = field(default_factory=MaskGenerator)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.masks, Mapping):  # a config node without _target_
            self.masks = MaskGenerator(**self.masks)

    def collate(self, items: list, rng: random.Random | None = None) -> dict:
        """ImageDecoder's batch plus one random mask per image."""
        batch = super().collate(items, rng)
        h, w = items[0][0].shape[:2]
        rng = rng if rng is not None else random.Random(0)
        batch["mask"] = torch.from_numpy(np.stack([self.masks(h, w, rng) for _ in items]))[:, None]
        return batch
