"""A time budget for one call of a resumable pipeline (a 10-minute device call, a short SLURM slot).

A stage starts only when the time left can hold its start (a training stage: start-up, torch.compile's
warm-up and some steps; any other stage: the whole of it, they are short); a training stage gets a
`Deadline` callback that checkpoints and stops it `save` seconds before the end. Either way the call ends
cleanly (`BudgetSpent`, or the run's `Preempted`), and the same command run again skips the finished stages
and resumes the stopped one from its checkpoint (ldmlab.pipeline.run.run_stage, train.py's resume=auto).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

DEADLINE = "ldmlab.callbacks.deadline.Deadline"


class BudgetSpent(Exception):
    """Too little of the call's time is left to start the next stage."""


@dataclass
class Budget:
    """`seconds` for the whole call (None: no limit), counted from `started` (time.time())."""

    seconds: float | None = None
    start_training: float = 150.0  # s left that a training stage needs to start (start-up, warm-up, steps)
    start_other: float = 30.0  # s left that any other stage needs to start (they are not interruptible)
    save: float = 25.0  # a training run is stopped this long before the end: its step, the checkpoint, the exit
    started: float = field(default_factory=time.time)

    def left(self) -> float:
        """Seconds left of the budget (inf without one)."""
        return math.inf if self.seconds is None else self.started + self.seconds - time.time()

    def require(self, stage: str, training: bool) -> None:
        """Raise BudgetSpent when `stage` cannot start in the time left."""
        need = self.start_training if training else self.start_other
        if (left := self.left()) < need:
            raise BudgetSpent(f"{left:.0f} s left of budget.seconds={self.seconds:g}, {stage} needs {need:g} s "
                              f"to start (budget.start_{'training' if training else 'other'})")

    def guard(self, stage: str, fn: Callable[[Path], dict], training: bool = False) -> Callable[[Path], dict]:
        """`fn`, started only when the budget allows (run_stage calls it only for an unfinished stage)."""

        def guarded(out: Path) -> dict:
            self.require(stage, training)
            return fn(out)

        return guarded

    def arm(self, cfg: DictConfig) -> DictConfig:
        """Add the `Deadline` callback to a composed train.py config (not to its overrides: a stage's settings,
        and so whether it is finished, do not depend on the budget of the call that runs it)."""
        if self.seconds is not None:
            with open_dict(cfg):
                cfg.callbacks = cfg.get("callbacks") or {}
                cfg.callbacks.deadline = {"_target_": DEADLINE, "stop_at": self.stop_at()}
        return cfg

    def stop_at(self) -> float:
        """When a training run is asked to stop (seconds since the epoch)."""
        assert self.seconds is not None
        return self.started + self.seconds - self.save

    @classmethod
    def from_config(cls, node: Any) -> Budget:
        """A Budget from a config node {seconds, start_training, start_other, save, started}."""
        settings = {k: v for k, v in dict(node or {}).items() if v is not None or k == "seconds"}
        return cls(**settings)  # started: null (or absent) = now
