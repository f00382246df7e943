"""NoisyClassifierModule: ADM's noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol
2021, sec. 4.1), trained on the LDM's scaled latents noised by the configured forward process at uniform t
(the objective's own draw: DDPM Algorithm 1's t for ε/v/x0, the flow path for flow models), cross-entropy, with
accuracy logged. Export: `classifier.safetensors` with its architecture, the latent shape and scale it saw and
the noise path it was trained on, which `sample.py classifier=...` checks against the LDM.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from ldmlab.diffusion import Diffusion
from ldmlab.lit.latents import LatentModule
from ldmlab.lit.weights import save_weights
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.noisy_classifier import NoisyClassifier

EXPORT_NAME = "classifier.safetensors"


class NoisyClassifierModule(LatentModule):
    """Cross-entropy of `classifier(x_t, t)` against the batch labels; x_t from the objective's training draw."""

    def __init__(
        self,
        classifier: NoisyClassifier,
        diffusion: Diffusion,  # its forward process (schedule, prediction): the guided LDM's; no sampler needed
        vae: AutoencoderKL | None = None,
        latent_scale: float | None = None,
        seed: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier", "diffusion", "vae", "optimizer", "lr_scheduler"])
        self.classifier, self.diffusion, self.seed = classifier, diffusion, seed
        # fails early for an ε/v/x0 model without a schedule
        self.noise_path = diffusion.prediction.noise_path(diffusion.noise_schedule)
        self.set_latent_source(vae, latent_scale)  # lit.latents: the frozen VAE, the scale (estimated if None)
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=3e-4)
        self.scheduler_factory = lr_scheduler

    def classification(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(cross-entropy, accuracy) on the batch's latents noised at random t (ADM sec. 4.1)."""
        labels = batch["label"].long()
        if bool((labels < 0).any()) or bool((labels >= self.classifier.num_classes).any()):
            raise ValueError(f"batch labels {labels.tolist()} outside [0, {self.classifier.num_classes}): set "
                             "model.classifier.num_classes to the dataset's class count")
        # t and x_t as the diffusion model draws them; its regression target and weight are not needed here
        x_t, t, _, _ = self.diffusion.training_inputs(self.latents(batch, generator), generator)
        logits = self.classifier(x_t, t)  # (B, K)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=-1) == labels).float().mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        # noise seeded by (model.seed, step, rank): reproducible and resume-exact, as the LDM's
        g = torch.Generator(device=self.device)
        g.manual_seed(hash((self.seed, self.global_step, self.global_rank, 0)) % (2**63))
        loss, acc = self.classification(batch, g)
        size = len(batch["label"])
        self.log("train/loss", loss.detach(), batch_size=size)
        self.log("train/acc", acc, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)  # fixed: comparable across runs
        loss, acc = self.classification(batch, g)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["label"]))
        self.log("val/acc", acc, prog_bar=True, sync_dist=True, batch_size=len(batch["label"]))

    def configure_optimizers(self) -> Any:
        opt, scheduler = self.skipping("train/loss", self.optimizer_factory(self.classifier.parameters()),
                                       self.scheduler_factory)
        if scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["classifier_config"] = dict(self.classifier.config)

    def export_weights(self, dirpath: str | Path, ema: dict[str, dict[str, Tensor]] | None = None) -> list[Path]:
        """`classifier.safetensors` (EMA weights when kept) with what sample.py checks against the LDM."""
        weights = (ema or {}).get("classifier")
        extra = {"latent_scale": str(float(self.latent_scale)), "noise_path": self.noise_path}
        if self._latent_shape is not None:
            extra["latent_shape"] = ",".join(map(str, self._latent_shape))
        return [save_weights(Path(dirpath) / EXPORT_NAME, weights if weights is not None else
                             self.classifier.state_dict(), self.classifier.config, "classifier", **extra)]


def classifier_metadata(path: str | Path) -> dict[str, Any]:
    """What an exported classifier records (config, latent_shape, latent_scale, noise_path), tensors not read."""
    import json

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ldmlab.classifier" or "config" not in meta:
        raise ValueError(f"{path} has format={meta.get('format')!r}, not 'ldmlab.classifier': give the "
                         f"<run>/export/{EXPORT_NAME} of a classifier run (python train.py experiment=classifier_demo)")
    shape = meta.get("latent_shape")
    return {"config": json.loads(meta["config"]), "noise_path": meta.get("noise_path"),
            "latent_shape": tuple(int(s) for s in shape.split(",")) if shape else None,
            "latent_scale": float(meta["latent_scale"]) if meta.get("latent_scale") else None}


def load_classifier(path: str | Path) -> NoisyClassifier:
    """The frozen NoisyClassifier of an exported `classifier.safetensors`, in eval mode."""
    from safetensors.torch import load_file

    classifier = NoisyClassifier(**classifier_metadata(path)["config"])
    classifier.load_state_dict(load_file(str(path)), strict=True)
    return classifier.eval().requires_grad_(False)
