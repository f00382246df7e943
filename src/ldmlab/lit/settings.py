"""The modules' grouped settings, typed, with one-line errors for unknown keys and bad values: the LDM's
model.training and model.sampling, the VAE's model.loss and model.gan."""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ldmlab.losses import vae as losses


@dataclass(frozen=True)
class Training:
    """model.training: the U-Net's initial weights (`unet_init`: an ldmlab unet.safetensors to fine-tune, or None:
    from scratch), CFG condition dropout (Ho & Salimans 2022), the loss weighting (uniform | min_snr, Hang et al.
    2023), offset noise, input perturbation (Ning et al. 2023), the training noise's seed (with step, rank)."""

    unet_init: str | None = None

    p_uncond: float = 0.1
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    input_perturbation: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss_weighting not in ("uniform", "min_snr"):
            raise ValueError(f"model.training.loss_weighting={self.loss_weighting!r}: valid are uniform, min_snr")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"model.training.p_uncond={self.p_uncond} must be in [0, 1)")


@dataclass(frozen=True)
class Sampling:
    """model.sampling: the guidance scales of the validation grids, the seed of their (and val/loss's) noise, and
    `sizes`: image (H, W) sizes to draw each grid at (e.g. one per aspect-ratio bucket); empty: the training size."""

    guidance_scales: tuple[float, ...] = (1.0, 5.0)
    sample_seed: int = 0
    sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_scales", tuple(self.guidance_scales))  # a config list
        object.__setattr__(self, "sizes", tuple((int(h), int(w)) for h, w in self.sizes or ()))

    def grid_shapes(self, channels: int, factor: int) -> dict[str, tuple[int, int, int] | None]:
        """Grid name suffix → latent (C, h, w) for each size (`_<H>x<W>`); {"": None} (the training size) without."""
        if not self.sizes:
            return {"": None}
        return {f"_{h}x{w}": (channels, h // factor, w // factor) for h, w in self.sizes}


@dataclass(frozen=True)
class VAELoss:
    """model.loss: the VAE's reconstruction terms (LDM contperceptual): the pixel loss `rec_loss` plus
    perceptual_weight × LPIPS under a Laplace log-variance (from logvar_init; optimised if learn_logvar, which
    LDM never does), plus kl_weight × KL."""

    rec_loss: str = "l1"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    logvar_init: float = 0.0
    learn_logvar: bool = False

    def __post_init__(self) -> None:
        _by_name(losses.get_pixel_loss, "model.loss.rec_loss", self.rec_loss, losses.PIXEL_LOSSES)


@dataclass(frozen=True)
class GAN:
    """model.gan: the PatchGAN from step disc_start (before it the discriminator neither runs nor steps): its loss
    `disc_loss` × disc_factor, and on the generator's side disc_weight × the adaptive weight (VQGAN eq. 7)."""

    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"

    def __post_init__(self) -> None:
        _by_name(losses.get_d_loss, "model.gan.disc_loss", self.disc_loss, losses.D_LOSSES)


def _by_name(lookup: Callable[[str], Any], key: str, name: str, valid: Mapping[str, Any]) -> None:
    """`lookup(name)` knows `name`, else one line naming `key` and the valid names."""
    try:
        lookup(name)
    except ValueError:
        raise ValueError(f"{key}={name!r}: valid are {', '.join(sorted(valid))}") from None


LDM_GROUPS: dict[str, type] = {"training": Training, "sampling": Sampling}
VAE_GROUPS: dict[str, type] = {"loss": VAELoss, "gan": GAN}


def settings(cls: type, given: Mapping[str, Any] | None, field: str) -> Any:
    """`cls` from a config dict; an unknown key is one line naming it and the valid ones."""
    valid = [f.name for f in fields(cls)]
    if unknown := sorted(set(given or {}) - set(valid)):
        raise ValueError(f"model.{field}.{unknown[0]} is unknown: valid are {', '.join(valid)}")
    return cls(**(given or {}))


def regroup(model: MutableMapping[str, Any], groups: Mapping[str, type] = LDM_GROUPS) -> MutableMapping[str, Any]:
    """A stored `model` config or hyper-parameters from before the `groups` (LDM's by default, VAE_GROUPS for the
    VAE's), with its flat keys moved there (and, for the LDM, its diffusion parts into `model.diffusion`)."""
    for group, cls in groups.items():
        for name in [f.name for f in fields(cls) if f.name in model]:
            if model.get(group) is None:
                model[group] = {}
            model[group][name] = model.pop(name)
    return regroup_diffusion(model) if groups is LDM_GROUPS else model


DIFFUSION_PARTS = ("noise_schedule", "prediction", "variance", "sampler")


def upgrade(model: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A `model` config a checkpoint stored, in today's layout (an LDM's or a noise-aware classifier's)."""
    kind = str(model.get("_target_", ""))
    if kind.endswith("LatentDiffusionModule"):
        return regroup(model)
    return regroup_diffusion(model) if kind.endswith("NoisyClassifierModule") else model


def regroup_diffusion(model: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stored LDM or noise-aware classifier config from before `model.diffusion` (ldmlab.diffusion.Diffusion),
    with its schedule, prediction, variance and sampler moved into that node."""
    if model.get("diffusion") is None and "prediction" in model:
        parts = {k: model.pop(k) for k in DIFFUSION_PARTS if k in model}
        model["diffusion"] = {"_target_": "ldmlab.diffusion.Diffusion", **parts}
    return model


def stored_groups(checkpoint: Any, groups: Mapping[str, type], weights_only: bool | None = None) -> dict[str, Any]:
    """The `groups` of the hyper-parameters a checkpoint (a path or a seekable file) stores, flat keys of older
    checkpoints regrouped; {} for what is not read here (a URL): Lightning's loader reads it as stored."""
    load = partial(torch.load, map_location="cpu", weights_only=weights_only is not False)
    if hasattr(checkpoint, "seek"):
        start, ckpt = checkpoint.tell(), load(checkpoint)
        checkpoint.seek(start)
    elif Path(checkpoint).is_file():
        ckpt = load(checkpoint, mmap=True)  # the pickle only: tensors stay on disk
    else:
        return {}
    stored = regroup(dict(ckpt.get("hyper_parameters") or {}), groups)
    return {group: stored[group] for group in groups if group in stored}
