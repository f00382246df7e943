"""SlurmRequeue: on SLURM's warning signal, checkpoint at a step boundary on every rank, requeue, exit.

`#SBATCH --signal=SIGUSR1@90 --requeue` (slurm/train.sbatch, hydra/launcher=slurm) sends SIGUSR1 to every task
90 s before the time limit. Lightning's own handler saves the checkpoint inside the signal handler, wherever
each rank happens to be (a collective barrier in the middle of a step: ranks can deadlock, and the state is
mid-step), then keeps training until SLURM's SIGKILL, so the steps after the checkpoint run twice. This callback
installs its handler first (Lightning then leaves the signal alone) and only sets a flag; at the next train
batch end the ranks agree on it and save Lightning's `hpc_ckpt_<n>.ckpt` in the run dir; at the start of the
following batch (the step's metrics are logged by then) rank 0 requeues the job and every rank stops.
On restart Lightning itself resumes from the newest `hpc_ckpt_*` (`trainer.fit(ckpt_path=None)` on SLURM).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)
HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # Lightning's names for SLURM checkpoints (checkpoint_connector)


class Requeued(SystemExit):
    """Raised on every rank once the checkpoint is saved and the job requeued (SystemExit, like Lightning's
    SIGTERMException: it leaves fit, Hydra and submitit without being reported as a failure)."""


def hpc_checkpoints(dirpath: str | Path) -> list[Path]:
    """The `hpc_ckpt_<n>.ckpt` files in `dirpath`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(dirpath).glob("hpc_ckpt_*.ckpt") if (m := HPC_CKPT.search(p.name))]
    return [p for _, p in sorted(found)]


def resume_checkpoint(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """Where a restarted SLURM job resumes: its newest `hpc_ckpt_*`, else (a requeue without one, e.g. a
    preemption by SIGTERM only) the run's `last.ckpt`; `ckpt_path` unchanged off SLURM or on a first start.

    Lightning itself looks for the HPC checkpoint only when ckpt_path is None: a fine-tuning job started with
    ckpt_path=<weights> would otherwise go back to those weights after every requeue.
    """
    if not SLURMEnvironment.detect():
        return ckpt_path
    if hpc_checkpoints(trainer.default_root_dir):
        return "hpc"
    if int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0:
        lasts = [Path(cb.dirpath) / "last.ckpt" for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if lasts := sorted((p for p in lasts if p.is_file()), key=lambda p: p.stat().st_mtime):
            log.warning("restart %s without an HPC checkpoint: resuming from %s", os.environ["SLURM_RESTART_COUNT"],
                        lasts[-1])
            return str(lasts[-1])
    return ckpt_path


def slurm_job_id() -> str:
    """The id `scontrol requeue` needs: `<array job>_<task>` for an array task, else SLURM_JOB_ID."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class SlurmRequeue(pl.Callback):
    """Checkpoint + requeue on SLURM's requeue signal, at a train step boundary agreed by all ranks.

    A no-op off SLURM, and when the cluster environment has `auto_requeue=False`
    (`trainer.plugins=[{_target_: lightning_fabric.plugins.environments.SLURMEnvironment, auto_requeue: false}]`).
    Appends one JSON line per start, requeue and end to `<run dir>/<history>` (rank 0).
    """

    def __init__(self, history: str = "slurm_history.jsonl") -> None:
        self.history = history
        self._signum: int | None = None
        self._previous: Any = None
        self._requested = False
        self._saved: Path | None = None
        self._start_step = self._batches = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment  # the one Lightning's signal connector reads
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        self._signum = int(env.requeue_signal or signal.SIGUSR1)
        # Installed before fit's signal registration, so Lightning sees a handler and does not add its own.
        self._previous = signal.signal(self._signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True  # only a flag: a signal handler may run in the middle of a collective

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signum is not None:
            signal.signal(self._signum, self._previous)
            self._signum = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # after the checkpoint (if any) was restored
        if self._signum is not None:
            self._record(trainer, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._signum is not None:
            self._record(trainer, "end")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batches += 1
        # A one-element all-reduce per step: every rank takes the same decision at the same step.
        if self._signum is None or not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        # Saved here, where Lightning's own step checkpoints are saved (it resumes them exactly) ...
        self._saved = Path(trainer.default_root_dir) / f"hpc_ckpt_{self._next_version(trainer)}.ckpt"
        trainer.save_checkpoint(self._saved)  # every rank; rank 0 writes, then a barrier
        self._requested = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # ... but the job stops only now, once Lightning has logged the metrics of that step.
        if self._saved is None:
            return
        if trainer.is_global_zero:
            self._flush_loggers(trainer)
        # SLURM's SIGTERM (sent by the requeue) must not reach Lightning's SIGTERM handler, which broadcasts
        # from inside the handler; everything worth keeping is on disk.
        previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requeued = trainer.strategy.broadcast(self._requeue(trainer) if trainer.is_global_zero else False, src=0)
        if requeued:
            raise Requeued(0)
        signal.signal(signal.SIGTERM, previous_term)
        self._saved = None  # not requeued: go on training (the checkpoint stays for a manual resume)

    def _next_version(self, trainer: pl.Trainer) -> int:
        """1 + the newest version on rank 0, so every rank names the file rank 0 writes."""
        existing = hpc_checkpoints(trainer.default_root_dir) if trainer.is_global_zero else []
        latest = int(HPC_CKPT.search(existing[-1].name).group(1)) if existing else 0  # type: ignore[union-attr]
        return trainer.strategy.broadcast(latest + 1, src=0)

    def _flush_loggers(self, trainer: pl.Trainer) -> None:
        """Write out buffered metrics; tell W&B the run is being preempted and close it (resumed by id later)."""
        for logger in trainer.loggers:
            logger.save()
        if any(type(lg).__name__ == "WandbLogger" for lg in trainer.loggers):
            import wandb

            if wandb.run is not None:
                wandb.run.mark_preempting()
                wandb.finish()

    def _requeue(self, trainer: pl.Trainer) -> bool:
        """`scontrol requeue` this job (rank 0); whether SLURM accepted it."""
        job = slurm_job_id()
        self._record(trainer, "requeue", checkpoint=self._saved.name if self._saved else None)
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        ok = proc.returncode == 0
        if not ok:
            self._record(trainer, "requeue_failed", detail=proc.stderr.strip())
            log.warning("scontrol requeue %s failed (%s): training goes on until the time limit", job, proc.stderr)
        return ok

    def _record(self, trainer: pl.Trainer, event: str, **extra: Any) -> None:
        """Append one history line (rank 0): event, job id, restart count, global step, batches of this start."""
        if not trainer.is_global_zero:
            return
        entry = {"event": event, "time": round(time.time(), 3), "job_id": os.environ.get("SLURM_JOB_ID"),
                 "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)), "global_step": trainer.global_step,
                 "start_step": self._start_step, "batches": self._batches, **extra}
        path = Path(trainer.default_root_dir) / self.history
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
