"""NaN/Inf skipping in one place: every backpropagated loss is checked, and an optimizer step is left out on every
rank when a loss it depends on was non-finite on any rank.

One bad batch (a NaN latent, an overflow) must not poison the weights, the optimizer moments or the EMA. The
pieces, all applied from outside the networks (`TrainingModule` wires them; training_step has no NaN code):

- `NonFiniteSkips`, the module's ledger: `observe(loss)` (called before every backward) keeps a 0/1 flag on the
  device, all-reduced with min so every rank skips together (a rank stepping alone would leave DDP's replicas
  apart). A step obeys every loss observed since the last steps were reported: the LDM's accumulated
  micro-batches; in the VAE the generator loss for the G step and both losses for the D step (a non-finite
  G loss skips both updates).
- `SkipNonFinite`, an optimizer proxy: a fused optimizer (`_step_supports_amp_scaling`: Adam/AdamW fused=True)
  gets the flag as `found_inf` and its kernel leaves weights, moments and step count as they were, with no host
  sync; any other optimizer has the flag read before its step, which is then left out (one host sync).
- `SkipAwareLR`, a scheduler proxy: the LR schedule advances once per step taken.

The host learns of a step's flags when someone asks (the scheduler, NonFiniteGuard, a checkpoint, the end of the
batch): at once on the CPU and for non-fused optimizers; on CUDA for fused ones a step later (`PendingStep`,
copied without blocking), so the GPU never waits; a run of skips is read at once, so the guard stops on the step
that reaches its limit. The scheduler step of the batch in which a skip becomes known is left out.

`trainer.global_step` counts batches, skipped or not, on every path (the VAE's D step is not counted:
`VAEModule._step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def finite_flag(loss: Tensor, reduce: Callable[..., Tensor] | None = None) -> Tensor:
    """1.0 on the device when `loss` is finite (on every rank, with `reduce` = a strategy's reduce), else 0.0."""
    flag = torch.isfinite(loss.detach()).all().float()
    return flag if reduce is None else reduce(flag, reduce_op="min")


class PendingStep:
    """A step's finite flags and shown loss on their way to the host: a non-blocking copy into pinned memory and a
    CUDA event, so reading them later waits for that step's forward only, not for the work queued after it. CPU
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


class NonFiniteSkips:
    """The module's ledger of non-finite losses, one name per optimizer (the LDM has one, the VAE two).

    Read by callbacks: `reports` lists (global step, skipped names) of the steps whose flags the host learnt
    this batch; `skipped_on_host` the names whose step this batch left out on the host (the EMA leaves the batch
    out too); `last_loss` the newest shown loss read (a host number for the progress bar: Lightning turns a GPU
    value shown there into a host sync at every step). `defer`: read a fused step's flags a step late; None: on
    CUDA only.
    """

    def __init__(self, names: tuple[str, ...] = ("train/loss",)) -> None:
        self.names = names
        self.defer: bool | None = None
        self.unscheduled = dict.fromkeys(names, 0)  # skipped steps whose scheduler step is still to be left out
        self.last_loss: float | None = None
        self.skipped_on_host: list[str] = []
        self._reports: list[tuple[int, list[str]]] = []
        self._step = 0
        self._running: Tensor | None = None  # min of the flags observed since the step group began
        self._shown: Tensor | None = None
        self._taken: dict[str, Tensor] = {}  # each stepped optimizer's flag, this group
        self._deferred = True
        self._pending: tuple[int, PendingStep] | None = None
        self._last_skipped = False

    # ---------------------------------------------------------------- fed by the module and the optimizers

    def begin(self, step: int) -> None:
        """A training batch starts at global step `step`."""
        self._close()
        self._reports, self.skipped_on_host, self._step = [], [], step

    def observe(self, loss: Tensor, reduce: Callable[..., Tensor] | None = None) -> None:
        """A loss about to be backpropagated; the first one of a group is shown unless `show` says otherwise."""
        flag = finite_flag(loss, reduce)
        self._running = flag if self._running is None else torch.minimum(self._running, flag)
        if self._shown is None:
            self._shown = loss.detach()

    def show(self, loss: Tensor) -> None:
        """The value the progress bar shows for this batch (the VAE shows its reconstruction loss)."""
        self._shown = loss.detach()

    def take(self, name: str, fused: bool) -> Tensor | None:
        """The flag `name`'s step obeys (None: no loss observed); a fused step on CUDA is read a step late."""
        flag = self._running
        if flag is not None:
            self._taken[name] = flag
            defer = flag.is_cuda if self.defer is None else self.defer
            self._deferred = self._deferred and fused and defer
        return flag

    # ---------------------------------------------------------------- read by schedulers, callbacks, checkpoints

    @property
    def reports(self) -> list[tuple[int, list[str]]]:
        """(global step, skipped loss names) of the steps whose flags the host learnt this batch."""
        self._close()
        return self._reports

    def owes(self, name: str) -> bool:
        """True (and one debt paid) when `name`'s next scheduler step is to be left out."""
        self._close()
        if self.unscheduled[name] == 0:
            return False
        self.unscheduled[name] -= 1
        return True

    def shown_loss(self) -> float | None:
        """The newest shown loss the host has read."""
        self._close()
        return self.last_loss

    def _close(self) -> None:
        """End the step group once an optimizer stepped: read the previous group's flags (its forward finished
        long ago: no stall) and hold this one's, or read it at once (not deferred, or during a run of skips)."""
        if not self._taken:
            return
        one = torch.ones_like(next(iter(self._taken.values())))
        flags = torch.stack([self._taken.get(name, one) for name in self.names])
        staged = PendingStep(flags, self._shown if self._shown is not None else one)
        deferred = self._deferred
        self._taken, self._running, self._shown, self._deferred = {}, None, None, True
        self._resolve()
        self._pending = (self._step, staged)
        if not deferred or self._last_skipped:
            self._resolve()

    def _resolve(self) -> None:
        if self._pending is None:
            return
        (step, pending), self._pending = self._pending, None
        finite, self.last_loss = pending.read()
        skipped = [name for name, ok in zip(self.names, finite) if not ok]
        self._reports.append((step, skipped))
        for name in skipped:
            self.unscheduled[name] += 1
        self._last_skipped = bool(skipped)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints: the unread step travels as values, read when the resumed run would have read it."""
        self._close()
        pending = None if self._pending is None else [self._pending[0], *self._pending[1].read()]
        return {"unscheduled": dict(self.unscheduled), "pending": pending, "last_skipped": self._last_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unscheduled = state["unscheduled"]
        if isinstance(unscheduled, int):  # checkpoints of one-flag ledgers before names existed
            unscheduled = {self.names[0]: unscheduled}
        self.unscheduled = {name: int(unscheduled.get(name, 0)) for name in self.names}
        self._last_skipped = bool(state["last_skipped"])
        self._pending = None
        if (pending := state["pending"]) is not None:
            step, finite, loss = pending
            finite = finite if isinstance(finite, list) else [finite]
            self._pending = int(step), PendingStep(torch.tensor([float(f) for f in finite]), torch.tensor(loss))


class SkipNonFinite(Optimizer):
    """`inner` whose step is left out when a loss it depends on was non-finite on any rank (module docstring).

    A proxy: parameter groups, state and state dict are the wrapped optimizer's, so checkpoints, LR schedulers and
    Lightning see it unchanged.
    """

    def __init__(self, inner: Optimizer, skips: NonFiniteSkips, name: str) -> None:  # no super(): a proxy
        self.inner, self.skips, self.name = inner, skips, name
        # named as the wrapped class, so LearningRateMonitor still logs `lr-AdamW`
        self.__class__ = _named(type(inner).__name__)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run `closure` (Lightning's: training_step and backward), then step unless a watched loss was NaN/Inf."""
        loss = closure() if closure is not None else None
        fused = getattr(self.inner, "_step_supports_amp_scaling", False)  # fused kernels take found_inf
        finite = self.skips.take(self.name, fused)
        if fused:  # on the device: the kernel leaves everything as it was
            self.inner.__dict__.pop("found_inf", None)
            if finite is not None:
                self.inner.found_inf = 1.0 - finite
        elif finite is not None and not bool(finite):  # the step's one host sync
            self.skips.skipped_on_host.append(self.name)
            return loss
        self.inner.step()
        return loss


_NAMED: dict[str, type[SkipNonFinite]] = {}


def _named(name: str) -> type[SkipNonFinite]:
    """The SkipNonFinite subclass called `name`."""
    if name not in _NAMED:
        _NAMED[name] = type(name, (SkipNonFinite,), {"__doc__": SkipNonFinite.__doc__})
    return _NAMED[name]


class SkipAwareLR(LRScheduler):
    """`inner`, an LR scheduler whose step is left out once per optimizer step skipped (`NonFiniteSkips.owes`)."""

    def __init__(self, inner: LRScheduler, skips: NonFiniteSkips, name: str) -> None:  # no super(): a proxy
        self.__dict__.update(inner=inner, skips=skips, name=name)

    def __getattr__(self, attr: str) -> Any:  # optimizer, last_epoch, base_lrs, ...: the wrapped scheduler's
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def step(self, *args: Any, **kwargs: Any) -> None:
        if not self.skips.owes(self.name):
            self.inner.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def skipping(skips: NonFiniteSkips, name: str, optimizer: Optimizer,
             scheduler_factory: Callable[[Optimizer], Any] | None = None) -> tuple[Optimizer, Any]:
    """`optimizer` wrapped to skip non-finite steps under `name`, and its scheduler (None without a factory)."""
    wrapped = SkipNonFinite(optimizer, skips, name)
    if scheduler_factory is None:
        return wrapped, None
    scheduler = scheduler_factory(wrapped)
    return wrapped, SkipAwareLR(scheduler, skips, name) if isinstance(scheduler, LRScheduler) else scheduler
