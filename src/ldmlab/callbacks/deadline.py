"""Deadline: end a run cleanly at a wall-clock time, as a preemption does (a checkpoint at a step boundary, then
exit 0), so that the same command run again resumes there. A job with a hard time limit (a 10-minute device
call, a short SLURM slot without requeue) sets `stop_at` a little before the limit: long enough before it for
the step under way, the checkpoint and the exit.

    +callbacks.deadline='{_target_: ldmlab.callbacks.deadline.Deadline, stop_at: 1767225600}'

A step boundary is the earliest point a run can stop: a first step that compiles (torch.compile's warm-up)
cannot be cut short, so whoever sets the deadline starts only runs with room for it
(ldmlab.pipeline.budget).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl

from ldmlab.callbacks.preemption import Preemption

log = logging.getLogger(__name__)


class Deadline(pl.Callback):
    """At the first step end past `stop_at` (seconds since the epoch, `time.time()`), ask the trainer's
    Preemption callback to checkpoint and stop (every DDP rank agrees on the step, as for a signal)."""

    def __init__(self, stop_at: float) -> None:
        self.stop_at = float(stop_at)
        self._asked = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._asked or time.time() < self.stop_at:
            return
        self._asked = True
        log.warning("deadline reached after step %d: checkpoint and stop", trainer.global_step)
        # by type: Preemption is added by ldmlab.fit.build after the config's callbacks, so it runs after this
        # hook in the same step end and saves that step
        preemption = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
        if preemption is None or not preemption.request_stop():
            log.warning("no active Preemption callback: stopping without a stop checkpoint (last.ckpt only)")
            trainer.should_stop = True
