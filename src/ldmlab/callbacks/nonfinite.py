"""Non-finite losses: the optimizer step is skipped on every rank, counted and logged; many in a row stop the run.

One bad batch (a NaN latent, an overflow) must not poison the weights, the optimizer moments or the EMA; a run
whose every step is NaN must not burn its allocation either. On a GPU with fused optimizers (the default
configs) no step waits for the GPU: each all-reduced `finite_flag` goes to its optimizer as `found_inf` (the
fused Adam/AdamW/SGD kernels then leave the weights, both moments and the step count as they were, on the
device) and to the host through `DeferredSkips`, which reads it a step later. The LDM has one flag; the VAE
one for the generator loss and one for the discriminator loss (a non-finite G loss skips both updates).
Otherwise, and on the CPU, the flag is read before the step and the step is left out: the LDM's after its
backward, the VAE's each loss before its backward with `skip_nonfinite` (one host sync each).

Modules record the losses whose update this batch left out on the host in `module.nonfinite` (the EMA then
leaves the batch out too) and list what became known this batch as `module.nonfinite_reports`, (global step,
losses) pairs, since a device-side skip is known a step late. `NonFiniteGuard` counts skipped steps
(`train/skipped_nonfinite`) and after `max_in_a_row` consecutive ones saves a checkpoint and stops with one
line saying which loss, where, and what to try. `trainer.global_step` counts a skipped batch in the LDM
(Lightning's automatic optimisation counts every batch that reaches the optimizer step) and in a VAE that
skips on the device (its generator's `step` ran), but not in a VAE that skips on the host (manual
optimisation counts generator steps taken).
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

    A min all-reduce, so every rank skips together: a rank that skipped its step while the others took theirs
    would leave DDP's replicas apart. No host sync here: the LDM hands it to the optimizer as `found_inf` and
    reads it on the host a step later (DeferredSkips); `skip_nonfinite` reads it at once.
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


class PendingStep:
    """A step's finite flags and loss on their way to the host: a non-blocking copy into pinned memory and a CUDA
    event, so reading them later waits for that step's forward only, not for the work queued after it. CPU
    values are already computed (CPU kernels run synchronously) and are read as they are."""

    def __init__(self, flags: Tensor, loss: Tensor) -> None:
        values = torch.cat([flags.detach().float().reshape(-1), loss.detach().float().reshape(1)])
        self._event: torch.cuda.Event | None = None
        if values.is_cuda:
            self._host = torch.empty(len(values), pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def read(self) -> tuple[list[bool], float]:
        """(finite per flag, loss)."""
        if self._event is not None:
            self._event.synchronize()
        return [bool(f) for f in self._host[:-1]], float(self._host[-1])


class DeferredSkips:
    """Host-side bookkeeping of steps skipped on the device (see the module docstring), one flag per optimizer
    step of a batch, named by the loss it guards (`names`: the LDM has one, the VAE two).

    `stage` the flags and loss once they are known; `commit(step, defer)` reads the previous step's (its
    forward finished long ago: no stall) and holds this one, or reads it at once with `defer=False` (CPU), and
    always while steps are being skipped, so the guard stops on the step that reaches its limit.
    `unscheduled[name]` counts skipped steps whose LR-scheduler step is still to be left out (`take_unscheduled`):
    the schedule advances once per step taken, a step or two late. `last_loss` is the newest loss read, for the
    progress bar (Lightning turns a GPU value shown there into a host sync at every step).
    """

    def __init__(self, names: tuple[str, ...] = ("train/loss",)) -> None:
        self.names = names
        self.reports: list[tuple[int, list[str]]] = []
        self.unscheduled = dict.fromkeys(names, 0)
        self.last_loss: float | None = None
        self._staged: PendingStep | None = None
        self._pending: tuple[int, PendingStep] | None = None
        self._last_skipped = False

    def stage(self, flags: Tensor, loss: Tensor) -> None:
        """`flags`: one 0/1 value per name (a 0-d tensor for a single name)."""
        self._staged = PendingStep(flags, loss)

    def commit(self, step: int, defer: bool) -> None:
        self.reports = []
        self.resolve()
        staged, self._staged = self._staged, None
        if staged is not None:
            self._pending = (step, staged)
            if not defer or self._last_skipped:
                self.resolve()

    def resolve(self) -> None:
        if self._pending is None:
            return
        (step, pending), self._pending = self._pending, None
        finite, self.last_loss = pending.read()
        skipped = [name for name, ok in zip(self.names, finite) if not ok]
        self.reports.append((step, skipped))
        for name in skipped:
            self.unscheduled[name] += 1
        self._last_skipped = bool(skipped)

    def take_unscheduled(self, name: str | None = None) -> bool:
        """True (and one debt paid) when `name`'s next scheduler step is to be left out."""
        name = name or self.names[0]
        if self.unscheduled[name] == 0:
            return False
        self.unscheduled[name] -= 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the unread step travels as values, read when the resumed run would have read it."""
        pending = None if self._pending is None else [self._pending[0], *self._pending[1].read()]
        return {"unscheduled": dict(self.unscheduled), "pending": pending, "last_skipped": self._last_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unscheduled = state["unscheduled"]
        if isinstance(unscheduled, int):  # checkpoints of one-flag ledgers before names existed
            unscheduled = {self.names[0]: unscheduled}
        self.unscheduled = {name: int(unscheduled.get(name, 0)) for name in self.names}
        self._last_skipped = bool(state["last_skipped"])
        if (pending := state["pending"]) is not None:
            step, finite, loss = pending
            finite = finite if isinstance(finite, list) else [finite]
            self._pending = int(step), PendingStep(torch.tensor([float(f) for f in finite]), torch.tensor(loss))
        else:
            self._pending = None


class NonFiniteGuard(pl.Callback):
    """Count steps skipped for a non-finite loss; stop with a checkpoint after `max_in_a_row` consecutive ones."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.skipped = self.in_a_row = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        reports = getattr(pl_module, "nonfinite_reports", None)
        if reports is None:  # any other module: its skips are known in the batch that has them
            reports = [(trainer.global_step, list(getattr(pl_module, "nonfinite", None) or []))]
        for step, names in reports:
            self._count(trainer, step, names)
        # a CPU tensor: Lightning turns a Python number into a tensor on the module's device, a blocking copy
        # that would make every step wait for the GPU
        pl_module.log("train/skipped_nonfinite", torch.tensor(float(self.skipped)))
        if reports and self.in_a_row >= self.max_in_a_row:  # a batch that reported nothing (yet) cannot stop
            self._stop(trainer, reports[-1][1])

    def _count(self, trainer: pl.Trainer, step: int, names: list[str]) -> None:
        if not names:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if trainer.is_global_zero and (self.skipped <= _WARNED or self.skipped % 100 == 0):
            log.warning("step %d: non-finite %s, optimizer step skipped (%d in a row, %d in all)",
                        step, ", ".join(names), self.in_a_row, self.skipped)

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
