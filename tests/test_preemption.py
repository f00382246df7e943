"""Preemption off SLURM and crash-safe checkpoints: SIGTERM/SIGUSR1 checkpoint at the next step boundary and exit
0 (every DDP rank, whichever got the signal), the next start resumes there; a SIGKILL in the middle of a save
leaves the previous checkpoint loadable; a full disk keeps it and training goes on."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import read_metrics
from pytorch_lightning.callbacks import ModelCheckpoint
from test_ema import TinyModule, loader
from test_resume import finish, launch, saved_step

import ldmlab.checkpointing
from ldmlab.checkpointing import AtomicCheckpointIO, newest_checkpoint

TINY_VAE = ["model=vae_tiny", "model.loss.perceptual_weight=0", "data.batch_size=4", "data.num_workers=1",
            "trainer.val_check_interval=50", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_train_steps=1",
            "trainer.enable_progress_bar=false", "~callbacks.progress_bar"]


def wait_for_step(proc: subprocess.Popen, ckpt: Path, step: int, log: Path, timeout: float = 300) -> None:
    """Until `ckpt` holds a step >= `step` (training runs, the signal handlers are installed)."""
    deadline = time.monotonic() + timeout
    while (saved_step(ckpt) or 0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_exits_0_and_the_rerun_resumes(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "first.log"
    proc = launch([*TINY_VAE, "trainer.max_steps=200", f"hydra.run.dir={run}"], tmp_path, log)
    wait_for_step(proc, run / "checkpoints" / "last.ckpt", 2, log)
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, log, timeout=120)  # exit code 0
    stop = saved_step(run / "hpc_ckpt_1.ckpt")
    assert stop is not None and 2 <= stop < 200
    assert f"stopped by a signal after step {stop}; checkpoint {run}/hpc_ckpt_1.ckpt" in text
    train_steps = [int(r["step"]) for r in read_metrics(run) if r["train/rec_loss"]]
    assert train_steps == list(range(stop))  # the metrics of the step it stopped after are logged
    text = finish(launch([*TINY_VAE, f"trainer.max_steps={stop + 2}", f"hydra.run.dir={run}"], tmp_path,
                         tmp_path / "second.log"), tmp_path / "second.log")
    assert f"resuming from {run}/hpc_ckpt_1.ckpt (step {stop})" in text
    steps = [int(r["step"]) for r in read_metrics(run) if r["train/rec_loss"]]
    assert steps == list(range(stop + 2))  # every step logged once, across both starts
    assert saved_step(run / "checkpoints" / "last.ckpt") == stop + 2


@pytest.mark.slow
def test_sigusr1_to_rank_0_stops_both_ddp_ranks_at_the_same_step(tmp_path: Path) -> None:
    """2 CPU ranks (gloo): the flag is all-reduced each step, so rank 1 stops with rank 0 and nothing hangs."""
    run, log = tmp_path / "run", tmp_path / "ddp.log"
    proc = launch([*TINY_VAE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "speed=none",
                   "trainer.precision=32-true", "trainer.max_steps=200", f"hydra.run.dir={run}"], tmp_path, log)
    wait_for_step(proc, run / "checkpoints" / "last.ckpt", 1, log)
    proc.send_signal(signal.SIGUSR1)  # the launching process is rank 0; rank 1 gets nothing
    text = finish(proc, log, timeout=180)
    stop = saved_step(run / "hpc_ckpt_1.ckpt")
    assert stop is not None and "GLOBAL_RANK: 1, MEMBER: 2/2" in text
    assert f"stopped by a signal after step {stop}" in text
    assert f"stopped by a signal after step {stop}" in (run / "train_rank1.log").read_text()


# ---------------------------------------------------------------- atomic writes

CHILD = """
import sys, torch
from ldmlab.checkpointing import AtomicCheckpointIO
state = {"global_step": 2, "w": torch.ones(60_000_000)}  # 240 MB: the save takes a while
if sys.argv[2] == "atomic":
    AtomicCheckpointIO().save_checkpoint(state, sys.argv[1])
else:
    torch.save(state, sys.argv[1])
"""


@pytest.mark.parametrize(("writer", "survives"), [("atomic", True), ("plain torch.save", False)])
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, writer: str, survives: bool) -> None:
    """A real SIGKILL while a 240 MB checkpoint is being written over last.ckpt. The plain torch.save case shows
    what the test detects: the old file is truncated in place and no longer loads."""
    last = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "w": torch.zeros(4)}, last)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(last), writer.split()[0]], env={**os.environ,
                            "OMP_NUM_THREADS": "1"})
    target = (lambda: list(tmp_path.glob("last.ckpt.tmp-*"))) if survives else (lambda: [last])
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 1 << 20 for p in target() if p.exists()):  # mid-write
        assert proc.poll() is None and time.monotonic() < deadline, "the save finished before the kill"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not survives:
        with pytest.raises(Exception):  # noqa: B017 - whatever torch raises on a truncated zip
            torch.load(last, weights_only=True)
        return
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.zeros(4))
    assert newest_checkpoint(tmp_path) == last  # the leftover temporary is no candidate
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, last)  # the next save cleans it up
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------- a full disk


def test_enospc_keeps_checkpoints_and_training_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Fault injection (a stand-in for a full disk): from step 3 on, fsync of a checkpoint raises ENOSPC. The
    run finishes; last.ckpt stays at step 2, and the best checkpoint is not deleted for an unsaved better one."""
    real_fsync, state = os.fsync, {"full": False}

    def fsync(fd: int) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    class FillDisk(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            state["full"] = trainer.global_step >= 2

    monkeypatch.setattr(ldmlab.checkpointing.os, "fsync", fsync)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best{step}", monitor="train_loss", every_n_train_steps=1)
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=1, enable_version_counter=False)

    class Logged(TinyModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    trainer = pl.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[FillDisk(), best, last], limit_val_batches=0,
                         plugins=[AtomicCheckpointIO()])
    with caplog.at_level("WARNING", logger="ldmlab.checkpointing"):
        trainer.fit(Logged(), loader())
    assert trainer.global_step == 5
    assert saved_step(tmp_path / "last.ckpt") == 2
    # ModelCheckpoint believes a better step was saved and deleted the old best: the plugin kept that file
    kept = sorted(p.name for p in tmp_path.glob("best*.ckpt"))
    assert len(kept) == 1 and saved_step(tmp_path / kept[0]) <= 2 and best.best_model_path != str(tmp_path / kept[0])
    assert "checkpoint" in caplog.text and "NOT saved: No space left on device (step 3); the previous checkpoint " \
                                           "is intact; training goes on" in caplog.text
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 20 MB tmpfs (needs root): room for one tiny-VAE checkpoint, not for a second beside it."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.strip()}): test_enospc_keeps_checkpoints_and_training_"
                    "goes_on covers a full disk with an injected ENOSPC instead")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_tmpfs_keeps_last_checkpoint_and_the_run_finishes(tmp_path: Path, tiny_tmpfs: Path) -> None:
    """A real ENOSPC: last.ckpt (13.7 MB) lives on a 20 MB tmpfs, so every save after the first has no room for
    its temporary file beside the old checkpoint."""
    log = tmp_path / "run.log"
    text = finish(launch([*TINY_VAE, "trainer.max_steps=3", f"callbacks.last_checkpoint.dirpath={tiny_tmpfs}",
                          f"hydra.run.dir={tmp_path}/run"], tmp_path, log), log)
    assert saved_step(tiny_tmpfs / "last.ckpt") == 1
    assert f"checkpoint {tiny_tmpfs}/last.ckpt NOT saved: No space left on device (step 2)" in text
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["last.ckpt"]
