"""ConditionPSNR: how close an image-conditioned model's samples come to the held-out ground truth (eval=psnr)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.metrics import psnr

WHERE = "callbacks.condition_psnr"


class ConditionPSNR(pl.Callback):
    """On the first `batches` batches of every validation (EMA weights, which the EMA callback swaps in then):
    one fixed-seed sample per image, conditioned on the batch's low-res image or masked image, and logs
    `val/psnr` (samples vs. the ground-truth crops, per-image mean in dB), `val/psnr_condition` (the condition's
    own picture: the bicubic upsampling, the masked image) and `val/psnr_autoencoder` (the crops through the VAE:
    the ceiling of any latent model on it)."""

    def __init__(self, batches: int = 4, seed: int = 0, guidance_scale: float = 1.0) -> None:
        if batches < 1:
            raise ValueError(f"{WHERE}.batches={batches} must be >= 1")
        self.batches, self.seed, self.guidance_scale = batches, seed, guidance_scale
        self._sums = torch.zeros(4, dtype=torch.float64)  # Σ psnr of sample, condition, autoencoder; images

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, LatentDiffusionModule) or pl_module.image_condition is None:
            raise TypeError(f"{WHERE} scores an image-conditioned LDM (model/image_condition=super_resolution | "
                            f"inpainting); this model has none: drop eval=psnr")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums.zero_()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or batch_idx >= self.batches:
            return
        if not isinstance(pl_module, LatentDiffusionModule) or pl_module.image_condition is None:
            return  # setup() refused it
        images = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
        truth = images["image"]
        n, condition = len(truth), pl_module.image_condition
        values = None if pl_module.conditioner is None else pl_module.conditioner.grid_values(batch, n)
        samples = pl_module.sample(values, n, self.guidance_scale, seed=self.seed + batch_idx, images=images)
        picture = condition.picture(images, (truth.shape[-2], truth.shape[-1]))
        vae = pl_module.vae
        assert vae is not None  # sample() decoded through it
        with torch.no_grad():
            rec = vae.decode(vae.encode(truth).mode()).clamp(-1, 1)
        scores = [psnr(x, truth).sum() for x in (samples, picture, rec)]
        self._sums += torch.tensor([*scores, n], dtype=torch.float64)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._sums[-1] == 0:
            return
        *sums, count = self._sums.tolist()
        names = ("val/psnr", "val/psnr_condition", "val/psnr_autoencoder")
        pl_module.log_dict({name: total / count for name, total in zip(names, sums)}, sync_dist=True)
