"""Checkpoint files: atomic writes, a run's newest checkpoint, and per-rank state inside rank 0's file.

Lightning writes checkpoints through `trainer.strategy.checkpoint_io`; `AtomicCheckpointIO` (installed by
`ldmlab.fit.build`) writes `<name>.tmp-<pid>` next to the target, fsyncs it and renames it over the target, so a
process killed mid-save (SIGKILL, OOM, node failure) leaves the previous checkpoint whole. `resume_path` decides
where a run starts from: `ckpt_path=<file>`, `ckpt_path=<dir>` or `ckpt_path=last` (the newest checkpoint there),
and with `resume=auto` the run dir's own newest checkpoint when the run dir already has one (a restart).
`LastCheckpoint` and `TopKCheckpoint` (conf/callbacks/default.yaml) are the ModelCheckpoints that make every run
end with a resumable last.ckpt and keep exactly `save_top_k` best files across kills and restarts.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")  # Lightning's names for SLURM (here: any preemption) checkpoints


class _Recorder:
    """A file wrapper that keeps the first OSError: torch.save reports a failed write as a RuntimeError with no
    errno ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in `path`'s directory, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            out = _Recorder(f)
            try:
                torch.save(obj, out)
                f.flush()
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # left by killed processes
        stale.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with atomic local writes; a full disk keeps the previous checkpoint and training.

    On ENOSPC/EDQUOT the save is skipped with a one-line warning and the run goes on (the next save retries):
    the atomic write left the previous file intact, and stopping would lose the steps since. While the latest
    save failed, `remove_checkpoint` keeps files: ModelCheckpoint deletes the previous best right after
    "saving" a new one. Remote paths (s3://, ...) go through Lightning's own writer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failed_saves = 0  # consecutive saves lost to a full disk

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self.failed_saves += 1
            log.warning("checkpoint %s NOT saved: %s (step %s); the previous checkpoint is intact; training goes on "
                        "and the next save retries - free space in %s", path, os.strerror(e.errno),
                        checkpoint.get("global_step"), Path(path).parent)
            return
        self.failed_saves = 0

    def remove_checkpoint(self, path: Any) -> None:
        if self.failed_saves:
            log.warning("keeping %s: the newest checkpoint could not be written", path)
            return
        super().remove_checkpoint(path)


# ------------------------------------------------------------------ where a run resumes


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a checkpoint (read through mmap: the tensors stay on disk), None if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is no resume candidate
        log.warning("ignoring unreadable checkpoint %s (%s)", path, type(e).__name__)
        return None
    return int(ckpt.get("global_step", -1)) if isinstance(ckpt, dict) else None


def _preference(path: Path) -> int:
    """At equal steps: a preemption checkpoint (newest n first), then last.ckpt, then the rest."""
    if m := _HPC.search(path.name):
        return 2 + int(m.group(1))
    return 1 if path.name == "last.ckpt" else 0


def newest_checkpoint(*dirs: str | Path) -> Path | None:
    """The checkpoint with the highest global step among `*.ckpt` in `dirs` (ties: preemption > last > others)."""
    found = {p.resolve() for d in dirs if Path(d).is_dir() for p in Path(d).glob("*.ckpt") if p.is_file()}
    ranked = [(step, _preference(p), p.stat().st_mtime, p) for p in found if (step := checkpoint_step(p)) is not None]
    return max(ranked)[-1] if ranked else None


def run_checkpoint_dirs(trainer: pl.Trainer) -> list[Path]:
    """Where this run keeps checkpoints: the run dir (preemption checkpoints) and every ModelCheckpoint dirpath."""
    root = Path(trainer.default_root_dir)
    dirs = [root, root / "checkpoints"]
    dirs += [Path(d) for cb in trainer.checkpoint_callbacks if (d := getattr(cb, "dirpath", None))]
    return list(dict.fromkeys(dirs))


def resume_path(trainer: pl.Trainer, ckpt_path: str | None, resume: str | bool | None = "auto") -> str | None:
    """The checkpoint `trainer.fit` starts from.

    `ckpt_path`: a file; a directory or "last" (its / this run dir's newest checkpoint); None (fresh start).
    `resume="auto"`: when this run dir already holds a checkpoint (the same command re-run with the same
    hydra.run.dir, a SLURM requeue, a sweep re-launched in its sweep dir), continue from its newest one instead
    of `ckpt_path`, which only says where the first attempt started. `resume=false` never does.
    """
    own = newest_checkpoint(*run_checkpoint_dirs(trainer))
    if ckpt_path == "last":
        if own is None:
            raise FileNotFoundError(f"ckpt_path=last but {trainer.default_root_dir} holds no checkpoint: pass "
                                    f"hydra.run.dir=<the run dir to resume> or ckpt_path=<file or run dir>")
        return _announce(own)
    if resume not in (None, False, True, "auto", "never", "false"):
        raise ValueError(f"resume={resume!r}: use auto (continue this run dir's newest checkpoint) or false")
    if own is not None and resume in (True, "auto"):
        if ckpt_path is not None:
            log.warning("resume=auto: this run dir already has checkpoints, so ckpt_path=%s is ignored "
                        "(resume=false to start from it anyway)", ckpt_path)
        return _announce(own)
    if ckpt_path is not None and Path(ckpt_path).is_dir():
        found = newest_checkpoint(ckpt_path, Path(ckpt_path) / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory without checkpoints")
        return _announce(found)
    return ckpt_path


def _announce(path: Path) -> str:
    log.info("resuming from %s (step %s)", path, checkpoint_step(path))
    return str(path)


# ------------------------------------------------------------------ which files the checkpoint callbacks keep


class _LightningStateKey:
    """Keeps ModelCheckpoint's own state key, so checkpoints written before (or by plain ModelCheckpoints)
    restore into these subclasses and the reverse."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)  # type: ignore[misc]


class LastCheckpoint(_LightningStateKey, ModelCheckpoint):
    """`last.ckpt` (monitor=None, save_top_k=1): after every validation, every `every_n_train_steps`, and when
    training ends, so every run leaves a resumable checkpoint.

    Lightning's `save_last` refreshes last.ckpt only when a top-k file was saved, and nothing saves when
    `max_steps` ends between validations. A step that a validation follows is saved after it (the best
    checkpoint's bookkeeping and the validation's results included); the final step is saved at its batch end
    like a step-interval save (the loops mid-epoch: a resume with a larger max_steps continues exactly there).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if validation_follows(trainer):
            return  # on_validation_end saves this step
        if _final_step(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # max_epochs, max_time or should_stop without a validation after it (skipped if this step is saved)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


def validation_follows(trainer: pl.Trainer) -> bool:
    """Whether the fit loop validates right after the current training batch (Lightning's own decision)."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and not loop._skip_next_val and loop._should_check_val_fx(fetcher)


def _own_score(path: Path, state_key: str) -> float | None:
    """The score `path` was saved with as a top-k file of the callback `state_key`; None for other files."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["callbacks"][state_key]
    except Exception:  # noqa: BLE001 - another callback's, a foreign or a truncated file: not ours
        return None
    return next((float(v) for k, v in state.get("best_k_models", {}).items() if Path(k).name == path.name), None)


def _final_step(trainer: pl.Trainer) -> bool:
    return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step


class TopKCheckpoint(_LightningStateKey, ModelCheckpoint):
    """ModelCheckpoint whose top-k files stay `save_top_k` across kills and resumes.

    A run killed between saving a new best and refreshing last.ckpt resumes with an older view of its best
    files (or from the new best file itself, which Lightning then never deletes): the superseded best stayed
    on disk for good. On resume this reads, from each of its files in `dirpath`, the score it was saved with,
    keeps the `save_top_k` best and deletes the rest; a file the run resumed from leaves the top k like any.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.monitor is None or self.save_top_k < 1 or not self._resumes_this_run(trainer):
            return
        found = self._files_on_disk() if trainer.is_global_zero else {}
        scores = sorted(trainer.strategy.broadcast(found, src=0).items(), key=lambda kv: kv[1],
                        reverse=self.mode == "max")
        for path, _ in scores[self.save_top_k:]:
            log.info("removing %s: not among the %d best of this run", path, self.save_top_k)
            trainer.strategy.remove_checkpoint(path)
        self._set_best(dict(scores[: self.save_top_k]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a metric measured at some validations only (callbacks.sample_quality every N steps): the validations
        # without it neither compete nor fail; Lightning's ModelCheckpoint would raise on the missing key
        if self.monitor is not None and self.monitor not in trainer.callback_metrics:
            return
        super().on_validation_end(trainer, pl_module)

    def _resumes_this_run(self, trainer: pl.Trainer) -> bool:
        """A restart from this run's own checkpoint (last.ckpt, a best file, a preemption checkpoint); a run
        started from another run's checkpoint leaves files it finds in its dirpath alone, as Lightning does."""
        if trainer.ckpt_path is None or self.dirpath is None:
            return False
        here = {Path(self.dirpath).resolve(), Path(trainer.default_root_dir).resolve()}
        return Path(trainer.ckpt_path).resolve().parent in here

    def _files_on_disk(self) -> dict[str, float]:
        """{path: score} of the checkpoints in dirpath that this callback saved as top-k files."""
        scores = {str(p): _own_score(p, self.state_key) for p in sorted(Path(self.dirpath).glob("*.ckpt"))}
        return {path: score for path, score in scores.items() if score is not None}

    def _set_best(self, best: dict[str, float]) -> None:
        """best_k_models, best and k-th model as Lightning's `_update_best_and_save` leaves them."""
        self.best_k_models = {path: torch.tensor(score) for path, score in best.items()}
        pick_best, pick_worst = (max, min) if self.mode == "max" else (min, max)
        if best:
            self.best_model_path = pick_best(best, key=best.get)  # type: ignore[arg-type]
            self.best_model_score = self.best_k_models[self.best_model_path]
        if len(best) == self.save_top_k:
            self.kth_best_model_path = pick_worst(best, key=best.get)  # type: ignore[arg-type]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        else:  # fewer than k: any score gets in, as on a fresh start
            self.kth_best_model_path, self.kth_value = "", torch.tensor(-torch.inf if self.mode == "max" else torch.inf)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        # Lightning keeps the file a run resumed from; under resume=auto that is this callback's own best file
        resumed = trainer.ckpt_path is not None and Path(previous).absolute() == Path(trainer.ckpt_path).absolute()
        if resumed and previous != current and Path(previous).absolute().parent == Path(self.dirpath).absolute():
            return True
        return super()._should_remove_checkpoint(trainer, previous, current)

