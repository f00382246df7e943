"""EMA: an exponential moving average of a submodule's weights, used for validation, sampling and export."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ldmlab.lit.contract import TrainingModule
from ldmlab.messages import EMA_UNDER_FSDP  # the same line train.py's config check gives


def ema_decay(step: int, max_decay: float, warmup: bool = True, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay after `step` updates: 1 − (1 + step/γ)^−power capped at max_decay (Karras/diffusers EMA warm-up)."""
    if not warmup:
        return max_decay
    return min(max_decay, max(0.0, 1.0 - (1.0 + step / inv_gamma) ** -power))


class EMA(pl.Callback):
    """Keeps `shadow = d·shadow + (1−d)·θ` for `pl_module.<attr>` after every training step from start_step.

    `update_every` = k > 1 folds k steps into one update, shadow ← (Π d_i)·shadow + (1 − Π d_i)·θ: exact while θ
    stays put, and otherwise off by far less than the average's horizon 1/(1−d) (ema-pytorch's `update_every`). The
    owed steps are folded in before anything reads the shadow (validation, sampling, export, the last step) and
    are saved with it, so a resumed run continues bit-exactly. Every DDP rank holds identical parameters, so every
    rank keeps an identical shadow; it is saved in the checkpoint (callback state "EMA") and restored on resume.
    Validation runs with the EMA weights swapped in.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, inv_gamma: float = 1.0, power: float = 2 / 3,
                 start_step: int = 0, attr: str = "unet", validate_with_ema: bool = True,
                 update_every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be in [0, 1)")
        if update_every < 1:
            raise ValueError(f"ema.update_every={update_every} must be >= 1 (1: update after every step)")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.start_step, self.attr, self.validate_with_ema = start_step, attr, validate_with_ema
        self.update_every = update_every
        self.shadow: dict[str, Tensor] = {}
        self.num_updates = 0
        self.pending = 0  # steps taken since the last update (update_every > 1)
        self._backup: dict[str, Tensor] | None = None
        self._lists: tuple[list[Tensor], list[Tensor]] | None = None  # (shadow, weights), built once per fit

    @property
    def state_key(self) -> str:
        return "EMA"

    def _params(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The trainable tensors of `pl_module.<attr>`: all of them, or a LoRA run's adapters (the base is frozen)."""
        return {k: p for k, p in getattr(pl_module, self.attr).named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "FSDP" in type(trainer.strategy).__name__ and trainer.world_size > 1:
            raise ValueError(EMA_UNDER_FSDP.format(where=str(trainer.world_size)))
        params = self._params(pl_module)
        if not self.shadow:  # fresh run (a resumed one got its shadow from load_state_dict)
            self.shadow = {k: p.detach().float().clone() for k, p in params.items()}
        self.shadow = {k: v.to(params[k].device) for k, v in self.shadow.items()}
        # the same tensors every step: building these lists from named_parameters() cost ~9 ms of CPU per step
        # for SD1.5's 686 tensors (docs/BENCHMARKS.md, session 3 profile), time the GPU would wait for
        self._lists = [self.shadow[k] for k in params], [p.detach() for p in params.values()]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if isinstance(pl_module, TrainingModule) and pl_module.skips.skipped_on_host:  # a NaN/Inf loss
            return  # the weights did not move (lit.nonfinite); a step skipped on the device is averaged in
        if self._lists is None:  # not fitting (on_fit_start builds the lists)
            return
        if trainer.global_step <= self.start_step:  # before start: track the weights exactly
            torch._foreach_copy_(*self._lists)
            return
        self.pending += 1
        if self.pending >= self.update_every or trainer.global_step >= trainer.max_steps > 0:
            self.catch_up()

    @torch.no_grad()
    def catch_up(self) -> None:
        """Fold the steps taken since the last update into the shadow (nothing to do when none are owed)."""
        if not self.pending or self._lists is None:
            return
        shadow, weights = self._lists
        keep = math.prod(ema_decay(self.num_updates + i, self.decay, self.warmup, self.inv_gamma, self.power)
                         for i in range(self.pending))
        # shadow ← keep·shadow + (1−keep)·θ, as one multi-tensor kernel on the GPU (a loop launches one per tensor)
        torch._foreach_lerp_(shadow, [w if w.dtype == torch.float32 else w.float() for w in weights], 1.0 - keep)
        self.num_updates += self.pending
        self.pending = 0

    def averaged(self) -> dict[str, Tensor]:
        """The average, owed steps folded in: what exports and samplers read."""
        self.catch_up()
        return self.shadow

    @contextmanager
    def swapped(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """Run a block with the EMA weights in the module, then restore the trained weights."""
        self._swap_in(pl_module)
        try:
            yield
        finally:
            self._swap_out(pl_module)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        self.catch_up()
        params = self._params(pl_module)
        self._backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for k, p in self._params(pl_module).items():
                p.copy_(self._backup[k])
        self._backup = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_with_ema and self.shadow and not trainer.sanity_checking:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}, "num_updates": self.num_updates,
                "pending": self.pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = {k: v.clone() for k, v in state_dict["shadow"].items()}
        self.num_updates = int(state_dict["num_updates"])
        self.pending = int(state_dict.get("pending", 0))  # checkpoints from before update_every have none
        self._lists = None  # rebuilt by on_fit_start
