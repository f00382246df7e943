"""LatentModule: the base of the modules that train on a frozen VAE's scaled latents (the LDM, the noise-aware
classifier that guides it): cached raw latents or the VAE's posterior sample, times the latent scale, which is
estimated once from the first training batch when not given (LDM's scale_by_std) and travels in the state dict."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from ldmlab.lit.contract import TrainingModule
from ldmlab.lit.weights import scale_by_std
from ldmlab.nn.autoencoder import AutoencoderKL


class LatentModule(TrainingModule):
    """A TrainingModule with a frozen `vae` (or None: cached latents only) and a `latent_scale` buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.vae: AutoencoderKL | None = None
        self._latent_shape: tuple[int, ...] | None = None  # (C, h, w), from the first batch or the checkpoint
        self._scale_known = False  # a Python flag: reading the buffer every step would sync the GPU

    def set_latent_source(self, vae: AutoencoderKL | None, latent_scale: float | None) -> None:
        """The frozen first stage and the latent scale (None or 0: estimated from the first training batch)."""
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        # the scale travels in the state dict, so an estimated value is restored with the checkpoint
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale or 0.0)))

    def train(self, mode: bool = True) -> LatentModule:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen first stage: never in training mode
        return self

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents z·s: cached raw latents from the batch, else the VAE posterior sample of the images
        (drawn from `generator`: seeded per step, so a resumed run and validation draw the same)."""
        if "latent" in batch:
            raw = batch["latent"].float()
        elif self.vae is not None:
            raw = self.vae.encode(batch["image"]).sample(generator)
        else:
            raise ValueError("batch has no 'latent' and the model has no VAE: set model.vae or use data=wds_latents")
        if self._latent_shape is None:  # (C, h, w) of the first batch: what sample() draws by default (with
            self._latent_shape = tuple(raw.shape[1:])  # buckets, the first step's bucket, as every rank agrees)
        if not self._scale_known:
            if float(self.latent_scale) == 0.0:  # first training batch, over all ranks
                reduce = partial(self.trainer.strategy.reduce, reduce_op="sum") if self._trainer is not None else None
                self.latent_scale.fill_(scale_by_std(raw, reduce))
                rank_zero_info(f"latent scale estimated from the first batch: 1/std = {float(self.latent_scale):.5f}")
            self._scale_known = True
        return raw * self.latent_scale

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of the latents seen in training or validation (set on the first batch)."""
        if self._latent_shape is None:
            raise ValueError("latent shape unknown: pass latent_shape=(C, h, w) to sample()")
        return self._latent_shape

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.vae is not None:
            checkpoint["vae_config"] = dict(self.vae.config)
        if self._latent_shape is not None:
            checkpoint["latent_shape"] = list(self._latent_shape)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "latent_shape" in checkpoint:
            self._latent_shape = tuple(checkpoint["latent_shape"])
