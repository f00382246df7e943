"""Preemption: on SIGTERM or SIGUSR1, checkpoint at a step boundary agreed by all ranks, then stop (or requeue).

Off SLURM, SIGTERM (`kill`, a container stop, a cloud spot reclaim) or SIGUSR1 stops the run: checkpoint at the
next step boundary, then exit with code 0; the next start in the same run dir resumes there (resume=auto).
On SLURM, `#SBATCH --signal=SIGUSR1@90 --requeue` (slurm/train.sbatch, hydra/launcher=slurm) sends SIGUSR1 to
every task 90 s before the time limit: checkpoint, then `scontrol requeue`; a preemption, `scontrol requeue` or
`scancel` sends SIGTERM (SIGKILL follows after KillWait, 30 s by default): checkpoint, then stop. Lightning's
own handlers act inside the signal handler, wherever each rank happens to be: its SIGUSR1 handler saves a
checkpoint there (a barrier in the middle of a step can deadlock DDP, and the state is mid-step) and then
trains on until SLURM's SIGKILL, so the steps after the checkpoint run twice.

Here the handlers only set a flag. At the next train batch end the ranks agree on it (a one-element all-reduce
per step) and save `hpc_ckpt_<n>.ckpt` in the run dir (Lightning's name for SLURM checkpoints, used for every
stop). At the start of the following batch, once that step's metrics are logged, every rank stops; after
SLURM's SIGUSR1 rank 0 first runs `scontrol requeue` (after SIGTERM, SLURM already requeues or cancels the job).
On restart `ldmlab.checkpointing.resume_path` picks the run dir's newest checkpoint.
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
import torch
from lightning_fabric.loggers.logger import _DummyExperiment
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.loggers import WandbLogger

log = logging.getLogger(__name__)
HPC_CKPT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # Lightning's names for SLURM checkpoints (checkpoint_connector)
REQUEUE, STOP = 1, 2  # what a signal asks for; the ranks act on the largest request any of them got


class Preempted(SystemExit):
    """Raised on every rank once the checkpoint is saved (and the job requeued): a SystemExit with code 0, like
    Lightning's SIGTERMException, so it leaves fit, Hydra and submitit without a failure report."""


def hpc_checkpoints(dirpath: str | Path) -> list[Path]:
    """The `hpc_ckpt_<n>.ckpt` files in `dirpath`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(dirpath).glob("hpc_ckpt_*.ckpt") if (m := HPC_CKPT.search(p.name))]
    return [p for _, p in sorted(found)]


def save_stop_checkpoint(trainer: pl.Trainer) -> Path:
    """Save `<run dir>/hpc_ckpt_<n+1>.ckpt` (every rank calls this; rank 0 writes) and return its path."""
    existing = hpc_checkpoints(trainer.default_root_dir) if trainer.is_global_zero else []
    latest = int(HPC_CKPT.search(existing[-1].name).group(1)) if existing else 0  # type: ignore[union-attr]
    version = trainer.strategy.broadcast(latest + 1, src=0)  # every rank names the file rank 0 writes
    path = Path(trainer.default_root_dir) / f"hpc_ckpt_{version}.ckpt"
    trainer.save_checkpoint(path)
    return path


def slurm_job_id() -> str:
    """The id `scontrol requeue` needs: `<array job>_<task>` for an array task, else SLURM_JOB_ID."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


class Preemption(pl.Callback):
    """Checkpoint at a step boundary on SIGTERM or SIGUSR1, then stop; on SLURM, SIGUSR1 requeues instead.

    On SLURM with `auto_requeue=False` it does nothing (Lightning's defaults apply). Under SLURM, appends one
    JSON line per start, requeue, preemption and end to `<run dir>/<history>` (rank 0).
    """

    def __init__(self, history: str = "slurm_history.jsonl") -> None:
        self.history = history
        self._handlers: dict[int, Any] = {}  # signal -> its handler before fit, restored at teardown
        self._requested = self._pending = 0
        self._slurm = False
        self._saved: Path | None = None
        self._start_step = self._batches = 0

    @property
    def _active(self) -> bool:
        return bool(self._handlers)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = trainer._accelerator_connector.cluster_environment  # the one Lightning's signal connector reads
        self._slurm = isinstance(env, SLURMEnvironment)
        if self._slurm and not env.auto_requeue:
            return
        signum = int(env.requeue_signal or signal.SIGUSR1) if self._slurm else int(signal.SIGUSR1)
        self._handlers = {s: signal.getsignal(s) for s in (signum, signal.SIGTERM)}
        # Installed before fit registers its handlers: Lightning sees one and leaves this signal alone.
        signal.signal(signum, self._handler(REQUEUE if self._slurm else STOP))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # after the checkpoint (if any) was restored
        if self._active:
            # Lightning always registers SIGTERM when fit starts (its handler broadcasts from inside the
            # handler); ours replaces it for the training loop.
            signal.signal(signal.SIGTERM, self._handler(STOP, trainer))
            if trainer.received_sigterm:  # a SIGTERM during setup went to Lightning's handler
                self._requested = STOP
            self._record(trainer, "start")

    def request_stop(self) -> bool:
        """Stop as after SIGTERM (checkpoint at this step's end, exit 0), e.g. at a deadline
        (ldmlab.callbacks.deadline); False when this callback is off (SLURM without auto-requeue)."""
        if self._active:
            self._requested = max(self._requested, STOP)
        return self._active

    def _handler(self, request: int, trainer: pl.Trainer | None = None) -> Any:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._requested = max(self._requested, request)  # only a flag: this may run inside a collective
            if trainer is not None:
                # SLURM signals every process of the job, wandb-core too: any later W&B call would raise and
                # end the run before its checkpoint. Lightning's dummy experiment turns them into no-ops.
                for lg in trainer.loggers:
                    if isinstance(lg, WandbLogger):
                        lg._experiment = _DummyExperiment()  # type: ignore[assignment]

        return handler

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._handlers.items():
            signal.signal(signum, previous)
        self._handlers.clear()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._record(trainer, "end")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._batches += 1
        if not self._active:
            return
        if trainer.world_size > 1:  # the same decision on every rank: one all-reduce (and host sync) per step
            flag = torch.tensor(self._requested, device=trainer.strategy.root_device)
            self._pending = int(trainer.strategy.reduce(flag, reduce_op="max"))
        else:  # one process: the flag is ours alone; reading a GPU tensor back would stall the launch queue
            self._pending = self._requested
        if self._pending:
            self._saved = save_stop_checkpoint(trainer)
            self._requested = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._pending:
            return
        if self._pending == STOP:
            self._record(trainer, "preempted", checkpoint=self._saved.name if self._saved else None)
        if trainer.is_global_zero:
            self._flush_loggers(trainer)
        # From here on SIGTERM (SLURM's answer to the requeue) has nothing left to save: ignore it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self._pending == STOP:
            log.warning("stopped by a signal after step %d; checkpoint %s (the next start in this run dir resumes "
                        "there)", trainer.global_step, self._saved)
            raise Preempted(0)
        if trainer.strategy.broadcast(self._requeue(trainer) if trainer.is_global_zero else False, src=0):
            raise Preempted(0)
        # Not requeued: train on (the checkpoint stays for a manual resume), without the closed W&B run.
        trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, WandbLogger)]
        signal.signal(signal.SIGTERM, self._handler(STOP, trainer))
        self._pending = 0

    def _flush_loggers(self, trainer: pl.Trainer) -> None:
        """Write out buffered metrics; tell W&B the run is being preempted and close it (resumed by id later)."""
        for logger in trainer.loggers:
            logger.save()
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            import wandb

            if wandb.run is not None:
                try:
                    wandb.run.mark_preempting()
                    wandb.finish()
                    wandb.teardown()  # stop wandb-core before SLURM's SIGTERM does
                except Exception as e:  # noqa: BLE001 (never keep a stopping job from stopping)
                    log.warning("could not close the W&B run before stopping: %r", e)

    def _requeue(self, trainer: pl.Trainer) -> bool:
        """`scontrol requeue` this job (rank 0); whether SLURM accepted it."""
        job = slurm_job_id()
        self._record(trainer, "requeue", checkpoint=self._saved.name if self._saved else None)
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self._record(trainer, "requeue_failed", detail=proc.stderr.strip())
            log.warning("scontrol requeue %s failed (%s): training goes on until the time limit", job, proc.stderr)
        return proc.returncode == 0

    def _record(self, trainer: pl.Trainer, event: str, **extra: Any) -> None:
        """Append one history line (SLURM, rank 0): event, job id, restart count, global step, batches of this
        start."""
        if not (self._slurm and trainer.is_global_zero):
            return
        entry = {"event": event, "time": round(time.time(), 3), "job_id": os.environ.get("SLURM_JOB_ID"),
                 "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "global_step": trainer.global_step,
                 "start_step": self._start_step, "batches": self._batches, **extra}
        path = Path(trainer.default_root_dir) / self.history
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(entry) + "\n")


SlurmRequeue = Preemption  # the name slurm/README.md and older configs use
