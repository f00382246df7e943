"""SampleQuality: FID, KID, IS and precision/recall of fixed-seed EMA samples every N steps, logged as
`eval/<metric>_g<guidance>` so a sweep or Optuna can select on them (`optimized_metric=eval/fid_g4`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ldmlab.evaluation.features import build_feature_network
from ldmlab.evaluation.reference import Reference, cached_reference, describe_data, real_batches, stats_path
from ldmlab.evaluation.samples import Chunk, from_uint8
from ldmlab.evaluation.score import Plan, check_text_metrics, score_guidance
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.metrics import MetricOptions, check_sample_count, reference_statistics
from ldmlab.utils.images import make_grid, save_png

log = logging.getLogger("ldmlab.evaluation")
WHERE = "callbacks.sample_quality"


class SampleQuality(pl.Callback):
    """At the first validation at or after every `every_n_steps` steps, and at the last step (with the EMA
    weights, which the EMA callback swaps in for validation): `n` samples per guidance scale, split over ranks,
    scored against the validation data's features (computed once, cached under `stats_dir`). Logs
    `eval/<metric>_g<s>` for every metric and scale, `eval/seconds`, and `eval/time_share`: the evaluation's
    share of the wall time since the previous evaluation."""

    def __init__(self, features: dict[str, Any], every_n_steps: int = 5000, n: int = 1000,
                 guidance_scales: Sequence[float] = (1.0,), sampler: Any = None, batch_size: int = 50,
                 reference_n: int | None = None, stats_dir: str | Path = "eval_stats",
                 metrics: Sequence[str] = ("fid", "kid", "precision", "recall"), seed: int = 0,
                 images_dir: str | Path | None = None) -> None:
        self.features, self.every_n_steps, self.n = dict(features), every_n_steps, n
        self.guidance_scales, self.sampler, self.batch_size = tuple(guidance_scales), sampler, batch_size
        self.reference_n, self.stats_dir, self.metrics = reference_n or n, Path(stats_dir), tuple(metrics)
        self.seed, self.images_dir = seed, Path(images_dir) if images_dir else None
        self.network: Any = None
        self._reference: Reference | None = None
        self._prompts: list[str] = []
        self._last = (0, time.monotonic())  # (step, clock) of the previous evaluation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before any training: the feature network (a missing file is one line) and FD's sample minimum."""
        if not isinstance(pl_module, LatentDiffusionModule):
            raise TypeError(f"{WHERE} scores generated samples: it needs an LDM (model=unet_*), not "
                             f"{type(pl_module).__name__}")
        if self.network is None:
            args = dict(self.features)
            if args.get("name") == "vae" and not args.get("path"):
                if pl_module.vae is None:
                    raise ValueError(f"{WHERE}.features.name=vae: this model trains on cached latents without a "
                                     f"VAE; set {WHERE}.features.path=<the VAE that made them>")
                args["autoencoder"] = pl_module.vae
            self.network = build_feature_network(**args)
        check_text_metrics(self.metrics, pl_module, self.network, f"{WHERE}.metrics")
        if "fid" in self.metrics:
            check_sample_count(self.n, self.network.num_features, f"{WHERE}.n", "samples per guidance scale")
            check_sample_count(self.reference_n, self.network.num_features, f"{WHERE}.reference_n",
                               "reference images")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if trainer.sanity_checking or (trainer.global_step < self._last[0] + self.every_n_steps and not last):
            return
        started = time.monotonic()
        self.network.to(pl_module.device)
        reference, rows = self._reference_for(trainer, pl_module)
        for guidance in self.guidance_scales:
            for name, value in self._score(trainer, pl_module, guidance, reference, rows).items():
                pl_module.log(f"eval/{name}_g{guidance:g}", value)  # the same on every rank (SampleMetrics)
        seconds = time.monotonic() - started
        share = seconds / max(time.monotonic() - self._last[1], 1e-9)
        pl_module.log_dict({"eval/seconds": seconds, "eval/time_share": share})
        log.info("%s at step %d: %d samples per guidance scale, %s features, %.1f s (%.0f %% of the time since the "
                 "last)", WHERE, trainer.global_step, self.n, self.network.name, seconds, 100 * share)
        self._last = (trainer.global_step, time.monotonic())

    def _score(self, trainer: pl.Trainer, pl_module: LatentDiffusionModule, guidance: float, reference: Any,
               rows: torch.Tensor | None) -> dict[str, float]:
        options = MetricOptions(seed=self.seed, where=WHERE, samples_setting=f"{WHERE}.n",
                                reference_setting=f"{WHERE}.reference_n")
        plan = Plan(self.n, self.batch_size, self.seed, self.metrics, self.sampler, self._prompts)

        def show_first(chunk: Chunk, pixels: torch.Tensor) -> None:
            if chunk.index == 0 and trainer.is_global_zero:
                self._show(trainer, pixels, guidance)

        return score_guidance(pl_module, self.network, reference, rows, guidance, plan, trainer.global_rank,
                              trainer.world_size, options, on_chunk=show_first)

    def _reference_for(self, trainer: pl.Trainer, pl_module: LatentDiffusionModule) -> Reference:
        """The validation data's features: kept in memory, cached on disk by data, network and count."""
        if self._reference is None:
            datamodule = trainer.datamodule
            loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
            path = stats_path(self.stats_dir, describe_data(datamodule), self.network.name, self.reference_n)
            share = -(-self.reference_n // trainer.world_size)  # each rank reads its own validation shards
            finish = datamodule.on_after_batch_transfer if datamodule is not None else lambda b, i: b

            def compute() -> Reference:
                images = real_batches(loader, share, pl_module.vae, self._prompts, lambda b: finish(b, 0))
                return reference_statistics(self.network, (from_uint8(p, pl_module.device) for p in images),
                                            source=f"validation data of {type(datamodule).__name__}")

            self._reference = cached_reference(path, compute, write=trainer.is_global_zero)
            if not self._prompts and isinstance(pl_module.conditioner, TextConditioner):  # cached: read captions
                list(real_batches(loader, share, pl_module.vae, self._prompts, lambda b: finish(b, 0)))
        return self._reference

    def _show(self, trainer: pl.Trainer, pixels: torch.Tensor, guidance: float) -> None:
        """The first chunk's samples as a grid PNG (and a W&B image)."""
        root = self.images_dir or Path(trainer.default_root_dir) / "eval"
        path = save_png(make_grid(from_uint8(pixels), nrow=min(8, len(pixels))),
                        root / f"samples_g{guidance:g}_step{trainer.global_step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"eval/samples_g{guidance:g}", images=[str(path)], step=trainer.global_step)
