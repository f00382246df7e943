"""Loggers that need more than a `_target_`: a CSV logger that survives restarts, the W&B offline fallback."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_info


class _ContinuingWriter(ExperimentWriter):
    """metrics.csv kept across starts of a run, every row written at once, rewrites atomic."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self._first = True
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes metrics.csv here; the rows of the run's earlier starts stay."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._first and step is not None:
            # This process's first row: rows at or after its step were logged after the checkpoint it resumed
            # from, by a start that was killed; this one logs them again.
            self._first = False
            self._drop_rows_from(step)
        super().log_metrics(metrics_dict, step)
        self.save()  # now, not every 100 steps: a SIGKILL loses no row logged before it

    def _drop_rows_from(self, step: int) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) < step]
        if len(kept) < len(rows):
            self._write(self.metrics_keys, kept)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            self._write(fieldnames, list(csv.DictReader(f)))

    def _write(self, fieldnames: list[str], rows: list[dict]) -> None:
        """Replace metrics.csv in one rename: a kill mid-write leaves the old file, not half of it."""
        tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but a restarted run (resume, requeue) continues its metrics.csv.

    Lightning's writer deletes an existing metrics.csv and buffers rows for `flush_logs_every_n_steps`. This one
    appends every row as it is logged and, on the first row of a new start, drops the rows at or after that
    step (logged by a killed start after its last checkpoint): each step's row appears once. Local files only.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_api_key_present() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that logs offline (and says how to sync) when no API key is configured."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_api_key_present()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        rank_zero_info(
            f"W&B: no API key found, logging offline to {save_dir}/wandb; "
            f"upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def finish_wandb(loggers: list[Any], failed: bool = False) -> None:
    """End the W&B run of this job: otherwise the next job of a multirun (same process) logs into it."""
    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
