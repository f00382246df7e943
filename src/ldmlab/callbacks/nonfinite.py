"""NonFiniteGuard: counts optimizer steps skipped for a NaN/Inf loss; many in a row stop the run with a checkpoint.

The skipping itself is the module's (`ldmlab.lit.nonfinite`: every rank leaves the update out together, on the
device for fused optimizers). A module reports, through `TrainingModule.skips.reports`, the (global step, loss
names) of the steps whose flags the host learnt this batch (a step late on a GPU). The guard logs the count as
`train/skipped_nonfinite` and after `max_in_a_row` consecutive skips saves a checkpoint and stops with
`NonFiniteLossError`, whose one line says which loss, where, and what to try (train.py prints that line and exits
non-zero without a traceback).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from ldmlab.callbacks.preemption import save_stop_checkpoint
from ldmlab.lit.contract import TrainingModule

log = logging.getLogger(__name__)
_WARNED = 10  # skips warned one by one; after that every 100th


class NonFiniteLossError(RuntimeError):
    """Too many training steps in a row had a NaN or Inf loss."""


class NonFiniteGuard(pl.Callback):
    """Count steps skipped for a non-finite loss; stop with a checkpoint after `max_in_a_row` consecutive ones."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.skipped = self.in_a_row = 0
        self._message: str | None = None  # set once the run is to stop

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not isinstance(pl_module, TrainingModule):  # a module without the wrappers skips nothing
            return
        reports = pl_module.skips.reports
        for step, names in reports:
            self._count(trainer, step, names)
        # a CPU tensor: Lightning turns a Python number into a tensor on the module's device, a blocking copy
        # that would make every step wait for the GPU
        pl_module.log("train/skipped_nonfinite", torch.tensor(float(self.skipped)))
        if reports and self.in_a_row >= self.max_in_a_row:  # a batch that reported nothing (yet) cannot stop
            self._stop(trainer, *reports[-1])

    def _count(self, trainer: pl.Trainer, step: int, names: list[str]) -> None:
        if not names:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if trainer.is_global_zero and (self.skipped <= _WARNED or self.skipped % 100 == 0):
            log.warning("step %d: non-finite %s, optimizer step skipped (%d in a row, %d in all)",
                        step, ", ".join(names), self.in_a_row, self.skipped)

    def _stop(self, trainer: pl.Trainer, step: int, names: list[str]) -> None:
        """Save a checkpoint (the weights are those before the first skipped step) and end the run once this
        step's metrics row is logged: `should_stop` makes Lightning log it and leave the loop, and the next hook
        it reaches (validation, the epoch end) raises."""
        path = save_stop_checkpoint(trainer)
        self._message = (
            f"{self.in_a_row} training steps in a row had a non-finite {' and '.join(names)} (last at step "
            f"{step}); stopped with checkpoint {path}. Try a lower optimizer.lr, gradient clipping "
            f"(model.grad_clip for the VAE, trainer.gradient_clip_val for the LDM), trainer.precision=32-true, and "
            f"check the data; callbacks.nonfinite.max_in_a_row sets the limit")
        if trainer.is_global_zero:
            log.error(self._message)  # the line the user sees: train.py exits with no traceback
        trainer.should_stop = True

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_stopped()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self._message is not None:
            raise NonFiniteLossError(self._message)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state_dict["skipped"]), int(state_dict["in_a_row"])
