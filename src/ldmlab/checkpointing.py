"""Checkpoint files: atomic writes, a run's newest checkpoint, and per-rank state inside rank 0's file.

Lightning writes checkpoints through `trainer.strategy.checkpoint_io`; `AtomicCheckpointIO` (installed by
`ldmlab.run.build`) writes `<name>.tmp-<pid>` next to the target, fsyncs it and renames it over the target, so a
process killed mid-save (SIGKILL, OOM, node failure) leaves the previous checkpoint whole. `resume_path` decides
where a run starts from: `ckpt_path=<file>`, `ckpt_path=<dir>` or `ckpt_path=last` (the newest checkpoint there),
and with `resume=auto` the run dir's own newest checkpoint when the run dir already has one (a restart).
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

from ldmlab.utils.distributed import gather_per_rank, this_rank  # noqa: F401  (moved; re-exported)

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
