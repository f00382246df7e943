"""Resume: a run SIGKILLed after step k and restarted reaches, at step N, the state of an uninterrupted run,
bit for bit (weights, optimizers, schedulers, EMA, RNG, loops, data position); the data stream itself resumes
mid-epoch, across epoch ends, with workers and bad samples; `ckpt_path`/`resume=auto` pick the newest checkpoint;
metrics.csv continues without losing or repeating rows."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, shared_data_dir
from pytorch_lightning.callbacks import ModelCheckpoint
from test_data_pipeline import corrupt_shards, image_module, write_shards

from ldmlab.checkpointing import newest_checkpoint, resume_path
from ldmlab.data.pipeline import EpochLoader
from ldmlab.loggers import ContinuingCSVLogger

# ---------------------------------------------------------------- the data position, in-process


def loader_batches(loader: EpochLoader, n: int, it=None) -> tuple[list[tuple], object]:
    """The next `n` batches (keys, images) of `loader`, starting a new pass when one ends."""
    out, it = [], it if it is not None else iter(loader)
    while len(out) < n:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        assert set(b) == {"image", "label", "text", "key"}  # the stream position travels beside the batch
        out.append((b["key"], b["image"]))
    return out, it


@pytest.mark.parametrize(("mode", "workers"), [("exact", 0), ("exact", 2), ("resampled", 2)])
def test_stream_resumes_at_any_batch(tmp_path: Path, mode: str, workers: int) -> None:
    """Keys and augmented pixels after load_state_dict equal the uninterrupted stream's, mid-epoch, at an
    epoch's end and in the next epoch; a corrupt image and a truncated shard make raw reads ≠ batches × size."""
    urls, _ = corrupt_shards(tmp_path)

    def loader() -> EpochLoader:
        dm = image_module(urls, batch_size=3, image_size=8, random_flip=True, shuffle_buffer=4, seed=1,
                          max_bad_fraction=0.5, num_workers=workers, samples_per_epoch=21 if mode == "resampled" else None)
        return EpochLoader(dm.make_train_set(), num_workers=workers)

    per_epoch = len(loader())
    reference, _ = loader_batches(loader(), 2 * per_epoch + 2)
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 3):
        first = loader()
        head, _ = loader_batches(first, k)
        assert first.position[:2] == divmod(k, per_epoch)  # (epoch, batches): the loader's, not a batch key
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        tail, _ = loader_batches(resumed, len(reference) - k)
        for (keys, images), (ref_keys, ref_images) in zip(head + tail, reference):
            assert keys == ref_keys, f"resumed after {k} batches"
            assert torch.equal(images, ref_images), f"augmentation differs after resuming at {k}"


class KeyRecorder(pl.LightningModule):
    """Records (epoch, keys) of every training batch; one weight so there is an optimizer step."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.lin, self.seen = torch.nn.Linear(1, 1), seen

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["key"])))
        return self.lin(batch["image"].mean((1, 2, 3))[:, None]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_trainer_resume_continues_the_epoch_or_starts_the_next(tmp_path: Path) -> None:
    """Lightning's fit loop + our loader state: checkpoints mid-epoch and at an epoch's last batch resume with
    the batch that followed in the uninterrupted run (2 workers)."""
    urls = write_shards(tmp_path / "shards", [13, 7, 11, 9], manifest=True)  # 40 samples: 13 batches of 3

    def fit(run: Path, steps: int, ckpt: str | None = None) -> list:
        seen: list = []
        dm = image_module(urls, batch_size=3, num_workers=2, image_size=8, shuffle_buffer=5, seed=1)
        last = ModelCheckpoint(dirpath=run, filename="last", every_n_train_steps=1, enable_version_counter=False)
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=run, callbacks=[last], limit_val_batches=0)
        trainer.fit(KeyRecorder(seen), datamodule=dm, ckpt_path=ckpt)
        return seen

    reference = fit(tmp_path / "a", 30)
    assert [e for e, _ in reference] == [0] * 13 + [1] * 13 + [2] * 4
    for k in (5, 13, 26):  # mid-epoch, the last batch of epoch 0, of epoch 1
        run = tmp_path / f"b{k}"
        head = fit(run, k)
        tail = fit(run, 30, str(run / "last.ckpt"))
        assert head + tail == reference, f"resumed at step {k}"


# ---------------------------------------------------------------- killed runs, end to end


def launch(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`python train.py <args>` in the background (as conftest.run_train runs it), output to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={cwd}", f"paths.data_dir={shared_data_dir()}",
           *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    return text


def saved_step(path: Path) -> int | None:
    """global_step of a checkpoint (None while there is none); replaced atomically, so never half-read."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def kill_after(proc: subprocess.Popen, ckpt: Path, step: int, timeout: float = 300) -> int:
    """SIGKILL `proc` as soon as `ckpt` holds step >= `step`; the step it holds after the kill (the process may
    have saved the next one between the poll and the signal)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (seen := saved_step(ckpt)) is not None and seen >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return saved_step(ckpt)
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step {step} at {ckpt} (exit code {proc.returncode})")


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Paths where two checkpoint trees differ (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def training_state(path: Path) -> dict:
    """Everything in a checkpoint but what names the run dir (ModelCheckpoint paths, the stored config)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if not k.startswith("ModelCheckpoint")}
    for key in ("ldmlab_config", "hyper_parameters"):
        ckpt.pop(key, None)
    return ckpt


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def check_killed_run_resumes_exactly(tmp_path: Path, args: list[str], steps: int = 10,
                                     kill_at: int = 4) -> dict:
    """Run A to `steps`; run B (started alongside) SIGKILLed once a checkpoint of >= `kill_at` exists, then
    re-run with the same command (resume=auto); the final checkpoints agree bit for bit. Returns A's."""
    common = [*args, f"trainer.max_steps={steps}", "callbacks.last_checkpoint.every_n_train_steps=1",
              "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
              "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar"]
    a = launch([*common, f"hydra.run.dir={tmp_path}/a"], tmp_path, tmp_path / "a.log")
    b = launch([*common, f"hydra.run.dir={tmp_path}/b"], tmp_path, tmp_path / "b1.log")
    kill_after(b, tmp_path / "b" / "checkpoints" / "last.ckpt", kill_at)
    # the newest checkpoint of the killed start: last.ckpt, or a validation's top-k file written just before
    # last.ckpt caught up (the kill can fall between the two saves of one step)
    saved = [(saved_step(p), p.name == "last.ckpt", p) for p in (tmp_path / "b" / "checkpoints").glob("*.ckpt")]
    newest = max(s for s in saved if s[0] is not None)
    k, path = newest[0], newest[2]
    assert b.returncode == -signal.SIGKILL and k < steps
    resumed = launch([*common, f"hydra.run.dir={tmp_path}/b"], tmp_path, tmp_path / "b2.log")
    finish(a, tmp_path / "a.log")
    text = finish(resumed, tmp_path / "b2.log")
    assert f"resuming from {path} (step {k})" in text
    ref, got = training_state(tmp_path / "a/checkpoints/last.ckpt"), training_state(tmp_path / "b/checkpoints/last.ckpt")
    assert ref["global_step"] == steps and "RNGState" in ref["callbacks"]
    assert differences(ref, got) == []
    # metrics.csv: the rows of the killed start are kept and none repeats; only the row of step k-1 may be
    # lost (Lightning logs it after writing that step's checkpoint, and the kill can fall in between)
    logged, expected = rows(tmp_path / "b"), rows(tmp_path / "a")
    lost = [r for r in expected if r not in logged]
    assert logged == [r for r in expected if r not in lost]
    assert all(r["step"] == str(k - 1) for r in lost), lost
    return ref


@pytest.mark.slow
def test_killed_vae_run_resumes_bit_exact(tmp_path: Path) -> None:
    """VAE on the demo photos (posterior sampling: global RNG), GAN on from step 2, 2 DataLoader workers."""
    ref = check_killed_run_resumes_exactly(tmp_path, ["model=vae_tiny", "model.loss.perceptual_weight=0",
                                                      "model.gan.disc_start=2", "data.batch_size=4",
                                                      "data.num_workers=2"])
    assert len(ref["optimizer_states"]) == 2 and ref["optimizer_states"][1]["state"]  # D has stepped


@pytest.mark.slow
def test_killed_ldm_run_resumes_bit_exact(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """LDM on the tiny VAE's latents of the demo photos: EMA, warm-up schedule, CFG dropout, 1 worker."""
    ref = check_killed_run_resumes_exactly(tmp_path, ["model=unet_small", f"model.vae.path={tiny_assets['vae']}",
                                                      "model.diffusion.sampler.num_steps=2", "data.batch_size=4",
                                                      "data.num_workers=1"])
    assert ref["callbacks"]["EMA"]["num_updates"] == 10 and ref["lr_schedulers"]


# ---------------------------------------------------------------- which checkpoint, which rows


def fake_checkpoint(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)
    return path


def test_newest_checkpoint_and_resume_choices(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = pl.Trainer(default_root_dir=run, logger=False, enable_progress_bar=False)
    assert resume_path(trainer, None) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=last but .* holds no checkpoint"):
        resume_path(trainer, "last")
    other = fake_checkpoint(tmp_path / "other" / "x.ckpt", 50)
    assert resume_path(trainer, str(other)) == str(other)  # a first start goes where ckpt_path says
    assert resume_path(trainer, str(other.parent)) == str(other)  # a directory: its newest
    last = fake_checkpoint(run / "checkpoints" / "last.ckpt", 7)
    fake_checkpoint(run / "checkpoints" / "step0000005.ckpt", 5)
    (run / "checkpoints" / "broken.ckpt").write_bytes(b"PK\x03\x04 truncated")  # skipped with a warning
    assert resume_path(trainer, str(other)) == str(last)  # a restart continues its own run
    assert resume_path(trainer, str(other), resume=False) == str(other)
    assert resume_path(trainer, "last", resume=False) == str(last)
    hpc = fake_checkpoint(run / "hpc_ckpt_1.ckpt", 7)  # same step: the preemption checkpoint wins
    assert newest_checkpoint(run, run / "checkpoints") == hpc
    fake_checkpoint(run / "checkpoints" / "step0000009.ckpt", 9)
    assert newest_checkpoint(run, run / "checkpoints").name == "step0000009.ckpt"


def test_csv_logger_continues_and_drops_rows_after_the_resume_step(tmp_path: Path) -> None:
    first = ContinuingCSVLogger(str(tmp_path), name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step)
    # a new start resumed from step 3: rows 3..5 of the killed start are logged again, with a new column
    second = ContinuingCSVLogger(str(tmp_path), name="csv", version="")
    for step in range(3, 8):
        second.log_metrics({"train/loss": 10.0 + step, **({"val/psnr": 1.0} if step == 4 else {})}, step)
    got = rows(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in got] == [
        ("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "13.0"), ("4", "14.0"), ("5", "15.0"), ("6", "16.0"),
        ("7", "17.0")]
    assert [r["val/psnr"] for r in got] == ["", "", "", "", "1.0", "", "", ""]
    assert not list(tmp_path.glob("csv/*.tmp-*"))


# ---------------------------------------------------------------- which checkpoint files a run leaves

KILL_VAE = ["model=vae_tiny", "model.loss.perceptual_weight=0", "data.batch_size=4", "data.num_workers=0",
            "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "callbacks.image_grids=null"]


def top_k_files(run: Path) -> list[str]:
    """The best-checkpoint files of a run dir (everything in checkpoints/ but last.ckpt)."""
    return sorted(p.name for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")


@pytest.mark.slow
def test_kill_9_and_resume_leave_one_best_checkpoint_and_last(tmp_path: Path) -> None:
    """SIGKILL once a validation step's best file exists (last.ckpt saved every 3 steps too), resume with the
    same command: save_top_k=1 leaves exactly one best file, the best val/psnr of the whole run, plus last."""
    run = tmp_path / "run"
    args = [*KILL_VAE, "trainer.max_steps=12", "callbacks.last_checkpoint.every_n_train_steps=3",
            f"hydra.run.dir={run}"]
    first = launch(args, tmp_path, tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while saved_step(run / "checkpoints" / "step0000006.ckpt") is None:
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-4000:]
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finish(launch(args, tmp_path, tmp_path / "second.log"), tmp_path / "second.log")
    psnr = {int(r["step"]): float(r["val/psnr"]) for r in rows(run) if r.get("val/psnr")}
    best_step = max(psnr, key=psnr.get)
    assert top_k_files(run) == [f"step{best_step + 1:07d}.ckpt"], psnr  # steps are logged 0-based
    assert saved_step(run / "checkpoints" / "last.ckpt") == 12


@pytest.mark.slow
def test_a_run_ending_between_validations_leaves_last_ckpt_that_resumes_exactly(tmp_path: Path) -> None:
    """max_steps=5 with validation every 4 steps (and no step-interval saves): last.ckpt holds step 5, and the
    same command with max_steps=7 continues there and ends where an uninterrupted 7-step run ends, bit for bit."""
    common = [*KILL_VAE, "trainer.val_check_interval=4"]
    a = launch([*common, "trainer.max_steps=7", f"hydra.run.dir={tmp_path}/a"], tmp_path, tmp_path / "a.log")
    finish(launch([*common, "trainer.max_steps=5", f"hydra.run.dir={tmp_path}/b"], tmp_path, tmp_path / "b1.log"),
           tmp_path / "b1.log")
    assert saved_step(tmp_path / "b/checkpoints/last.ckpt") == 5
    text = finish(launch([*common, "trainer.max_steps=7", f"hydra.run.dir={tmp_path}/b"], tmp_path,
                         tmp_path / "b2.log"), tmp_path / "b2.log")
    finish(a, tmp_path / "a.log")
    assert f"resuming from {tmp_path}/b/checkpoints/last.ckpt (step 5)" in text
    ref, got = training_state(tmp_path / "a/checkpoints/last.ckpt"), training_state(tmp_path / "b/checkpoints/last.ckpt")
    assert ref["global_step"] == 7 and differences(ref, got) == []
    assert [r["step"] for r in rows(tmp_path / "b") if r["train/rec_loss"]] == [str(s) for s in range(7)]


class Scored(pl.LightningModule):
    """Validation logs `score` = the global step: every validation is a new best (mode=max)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).mean()

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 1)), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 1)), batch_size=2)


def fit_scored(run: Path, steps: int, ckpt: str | None = None, every: int | None = None) -> pl.Trainer:
    """`Scored` for `steps` with validation every 3 steps and the two checkpoint callbacks of the default config."""
    from ldmlab.checkpointing import LastCheckpoint, TopKCheckpoint

    best = TopKCheckpoint(dirpath=run, filename="step{step:07d}", auto_insert_metric_name=False, monitor="score",
                          mode="max", save_top_k=1)
    last = LastCheckpoint(dirpath=run, filename="last", save_top_k=1, enable_version_counter=False,
                          every_n_train_steps=every)
    trainer = pl.Trainer(max_steps=steps, val_check_interval=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=run, callbacks=[best, last],
                         num_sanity_val_steps=0)
    trainer.fit(Scored(), ckpt_path=ckpt)
    return trainer


def test_last_ckpt_follows_validation_and_the_final_step(tmp_path: Path) -> None:
    """every_n_train_steps=3 coincides with validation: last.ckpt is written after it (it knows the new best);
    max_steps=7 ends between validations: last.ckpt holds step 7; the state keys are ModelCheckpoint's."""
    trainer = fit_scored(tmp_path, 6, every=3)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    best_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint{'monitor': 'score'"))
    assert ckpt["global_step"] == 6 and [Path(p).name for p in best_state["best_k_models"]] == ["step0000006.ckpt"]
    assert trainer.checkpoint_callbacks[0].state_key.startswith("ModelCheckpoint{")
    fit_scored(tmp_path, 7, str(tmp_path / "last.ckpt"), every=3)
    assert saved_step(tmp_path / "last.ckpt") == 7
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step0000006.ckpt"]


def test_resume_keeps_save_top_k_best_files(tmp_path: Path) -> None:
    """Killed between a new best and last.ckpt: resuming from the older last.ckpt (which knows a best that was
    since deleted), or from the new best file itself (Lightning never deletes the file it resumed from), still
    leaves exactly one best file once the next better score is saved."""
    fit_scored(tmp_path, 6)
    stale_last = (tmp_path / "last.ckpt").read_bytes()  # knows step0000006 as the best
    fit_scored(tmp_path, 9, str(tmp_path / "last.ckpt"))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step0000009.ckpt"]
    (tmp_path / "last.ckpt").write_bytes(stale_last)  # as if killed before last.ckpt of step 9 was written
    trainer = fit_scored(tmp_path, 12, str(tmp_path / "last.ckpt"))
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step0000012.ckpt"]
    assert Path(trainer.checkpoint_callbacks[0].best_model_path).name == "step0000012.ckpt"
    fit_scored(tmp_path, 15, str(tmp_path / "step0000012.ckpt"))  # resume=auto's pick when last.ckpt lags
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step0000015.ckpt"]


def test_a_start_from_another_runs_checkpoint_leaves_files_alone(tmp_path: Path) -> None:
    """Only a restart from this run's own checkpoint re-reads the best files: fine-tuning from run a into a
    dir that already holds a best file of its own keeps that file, as Lightning does."""
    fit_scored(tmp_path / "b", 3)
    fit_scored(tmp_path / "a", 6)
    fit_scored(tmp_path / "b", 9, str(tmp_path / "a" / "last.ckpt"))
    assert sorted(p.name for p in (tmp_path / "b").glob("*.ckpt")) == [
        "last.ckpt", "step0000003.ckpt", "step0000009.ckpt"]
