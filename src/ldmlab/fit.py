"""The Lightning half of a training run (ldmlab.run.train calls `fit` once the config passed its check):
seed → data, module, callbacks, loggers, trainer → fit → the optimised metric."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ldmlab.callbacks.nonfinite import NonFiniteLossError
from ldmlab.callbacks.preemption import Preemption
from ldmlab.checkpointing import AtomicCheckpointIO, resume_path
from ldmlab.lit.contract import TrainingModule
from ldmlab.loggers import finish_wandb
from ldmlab.utils.distributed import ddp_job
from ldmlab.utils.wandb_run import configure_wandb

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-valued group (callbacks, loggers); null entries are skipped."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node and "_target_" in node]


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Instantiate the datamodule, the module (with its optimizer and LR-scheduler factories) and the trainer."""
    # _convert_="all": modules get plain dicts/lists, so saved hyperparameters load with weights_only=True
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    module = hydra.utils.instantiate(
        cfg.model,
        _convert_="all",
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
    )
    if isinstance(module, TrainingModule):  # checkpoints carry the config that rebuilds the model (sample.py)
        module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks.append(Preemption())  # SIGTERM/SIGUSR1: checkpoint at a step boundary, stop (SLURM: requeue)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")))
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not one the config chose
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # a crash mid-save keeps the previous checkpoint
    return datamodule, module, trainer


@ddp_job  # DDP ranks > 0 re-run this job (not the sweep) in its run dir; no process group outlives it
def fit(cfg: DictConfig) -> float | None:
    """Seed, build, log the resolved config, fit (resuming where the run dir says); return the optimised metric."""
    pl.seed_everything(cfg.seed, workers=True)
    configure_wandb(cfg)  # W&B id kept in the run dir (a requeued job continues its run); sweep jobs: one group
    datamodule, module, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        ckpt_path = resume_path(trainer, cfg.get("ckpt_path"), cfg.get("resume", "auto"))
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path,
                    weights_only=True)  # explicit: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD can't flip it
    except BaseException as err:
        with contextlib.suppress(Exception):  # e.g. wandb-core already killed by SLURM: keep the real exception
            finish_wandb(trainer.loggers, failed=True)
        if isinstance(err, NonFiniteLossError):  # its one line is logged, its checkpoint saved: no traceback
            raise SystemExit(1) from None
        raise
    finish_wandb(trainer.loggers)
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric"))
    if metric is None:
        log.warning("optimized_metric %r was not logged; metrics: %s", cfg.get("optimized_metric"),
                    sorted(trainer.callback_metrics))
        return None
    return float(metric)
