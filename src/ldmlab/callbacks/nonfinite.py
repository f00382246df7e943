"""Non-finite losses: the optimizer step is skipped on every rank, counted and logged; many in a row stop the run.

One bad batch (a NaN latent, an overflow) must not poison the weights, the optimizer moments or the EMA; a run
whose every step is NaN must not burn its allocation either. The VAE checks each loss before its backward with
`skip_nonfinite` (the generator and the discriminator loss); the LDM runs its backward and reads the all-reduced
`finite_flag` only then, in `optimizer_step` (a host sync after the forward would leave the GPU idle while the
CPU launches the backward). Both record the skipped losses in `module.nonfinite`; `NonFiniteGuard` counts them
(`train/skipped_nonfinite`) and after `max_in_a_row` consecutive skipped steps saves a checkpoint and stops with
one line saying which loss, where, and what to try. The EMA callback leaves a batch with a skipped loss out.
`trainer.global_step` counts a skipped batch in the LDM (Lightning's automatic optimisation counts every batch
that reaches the optimizer step) but not in the VAE (manual optimisation counts generator steps taken).
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ldmlab.callbacks.preemption import save_stop_checkpoint

log = logging.getLogger(__name__)
_WARNED = 10  # skips warned one by one; after that every 100th


class NonFiniteLossError(RuntimeError):
    """Too many training steps in a row had a NaN or Inf loss."""


def finite_flag(module: pl.LightningModule, loss: Tensor, so_far: Tensor | None = None) -> Tensor:
    """1.0 on the device when `loss` (and every loss in `so_far`) is finite on every rank, else 0.0.

    A min all-reduce, so every rank takes the same branch later: a rank that skipped its step while the others
    took theirs would leave DDP's replicas apart. No host sync: read it once the backward is queued.
    """
    flag = torch.isfinite(loss.detach()).all().float()
    if module._trainer is not None:
        flag = module.trainer.strategy.reduce(flag, reduce_op="min")
    return flag if so_far is None else torch.minimum(so_far, flag)


def skip_nonfinite(module: pl.LightningModule, loss: Tensor, name: str) -> bool:
    """True (and `name` recorded in `module.nonfinite`) when `loss` is NaN/Inf on any rank. One host sync."""
    if bool(finite_flag(module, loss)):
        return False
    module.nonfinite.append(name)
    return True


class NonFiniteGuard(pl.Callback):
    """Count steps skipped for a non-finite loss; stop with a checkpoint after `max_in_a_row` consecutive ones."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.skipped = self.in_a_row = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        names = list(getattr(pl_module, "nonfinite", None) or [])
        if not names:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1
            if trainer.is_global_zero and (self.skipped <= _WARNED or self.skipped % 100 == 0):
                log.warning("step %d: non-finite %s, optimizer step skipped (%d in a row, %d in all)",
                            trainer.global_step, ", ".join(names), self.in_a_row, self.skipped)
        # a CPU tensor: Lightning turns a Python number into a tensor on the module's device, a blocking copy
        # that would make every step wait for the GPU
        pl_module.log("train/skipped_nonfinite", torch.tensor(float(self.skipped)))
        if self.in_a_row >= self.max_in_a_row:
            self._stop(trainer, names)

    def _stop(self, trainer: pl.Trainer, names: list[str]) -> None:
        """Save a checkpoint (the weights are those before the first skipped step) and end the run."""
        path = save_stop_checkpoint(trainer)
        message = (
            f"{self.in_a_row} training steps in a row had a non-finite {' and '.join(names)} (last at step "
            f"{trainer.global_step}); stopped with checkpoint {path}. Try a lower optimizer.lr, gradient clipping "
            f"(model.grad_clip for the VAE, trainer.gradient_clip_val for the LDM), trainer.precision=32-true, and "
            f"check the data; callbacks.nonfinite.max_in_a_row sets the limit")
        if trainer.is_global_zero:
            log.error(message)  # the run's log file gets the line too, not only the traceback on stderr
        raise NonFiniteLossError(message)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state_dict["skipped"]), int(state_dict["in_a_row"])
