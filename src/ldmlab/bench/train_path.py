"""The training path users run, timed: `train.py model=unet_sd15 trainer=gpu data=synthetic_latents` in a
subprocess (Hydra composition, Lightning loop, EMA, logging), steady-state seconds per step from StepTimer."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.profilers import Profiler
from torch.profiler import ProfilerActivity, profile, record_function

from ldmlab.bench.profile import host_report, host_times, kernel_times, report
from ldmlab.callbacks.speed import synchronize_device
from ldmlab.utils.stand_ins import make_tiny_clip

REPO = Path(__file__).resolve().parents[3]
STEP_TIME = re.compile(r"StepTimer: ([0-9.]+) s/step")


class HookRanges(Profiler):
    """A Lightning profiler that only names each hook call (`[Callback]EMA.on_train_batch_end`, `[Strategy]...
    training_step`, `run_training_batch`) as a torch.profiler range, so StepProfile's host table shows where
    Lightning's loop spends the CPU. Cheap when no torch profiler is recording."""

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list[record_function]] = {}

    def start(self, action_name: str) -> None:
        scope = record_function(action_name)
        scope.__enter__()
        self._open.setdefault(action_name, []).append(scope)

    def stop(self, action_name: str) -> None:
        if scopes := self._open.get(action_name):
            scopes.pop().__exit__(None, None, None)

    def summary(self) -> str:
        return ""


class StepProfile(pl.Callback):
    """torch.profiler around `steps` training steps of a real run, from global step `skip` on: GPU time by kernel
    kind, the GPU's idle share and the host ranges that hold the CPU, written to `out` as Markdown."""

    def __init__(self, out: str, skip: int = 30, steps: int = 5) -> None:
        self.out, self.skip, self.steps = Path(out), skip, steps
        self._prof: profile | None = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.skip and self._prof is None and not self.out.exists():
            synchronize_device(pl_module)
            self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._prof.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._prof is None or trainer.global_step < self.skip + self.steps:
            return
        synchronize_device(pl_module)
        wall_ms = (time.perf_counter() - self._t0) * 1e3 / self.steps
        self._prof.__exit__(None, None, None)
        by_kind, kernels = kernel_times(self._prof, self.steps)
        text = report(f"train.py, steps {self.skip}-{self.skip + self.steps}", by_kind, kernels, wall_ms)
        self.out.write_text(text + "\n" + host_report(host_times(self._prof, self.steps)))
        self._prof = None


class SyncReport(pl.Callback):
    """The host syncs of `steps` training steps from global step `skip`: torch's CUDA sync debug mode warns at
    every call that makes the CPU wait for the GPU (`.item()`, a blocking copy, `nonzero`); each distinct call
    stack (its last frames in ldmlab, Lightning or torch) goes to `out` with its count. A run without a GPU has
    none to list and says so."""

    def __init__(self, out: str, skip: int = 4, steps: int = 4, frames: int = 6) -> None:
        self.out, self.skip, self.steps, self.frames = Path(out), skip, steps, frames
        self.sites: Counter[str] = Counter()
        self._restore: tuple | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.skip or self._restore is not None:
            return
        if pl_module.device.type != "cuda":
            self.out.write_text(f"{pl_module.device.type} run: no CUDA syncs to list\n")
            return
        self._restore = (warnings.showwarning, warnings.filters[:])
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._restore is None or trainer.global_step < self.skip + self.steps:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._restore
        lines = [f"host syncs in steps {self.skip}-{self.skip + self.steps}: {sum(self.sites.values())}", ""]
        lines += [f"{count} x\n{stack}" for stack, count in self.sites.most_common()]
        self.out.write_text("\n".join(lines) + "\n")

    def _record(self, message: Any, category: type, filename: str, lineno: int, *args: Any) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        if any(f.name == "set_sync_debug_mode" for f in frames):  # torch's notice that the mode is on: no sync
            return
        self.sites["\n".join(f"  {Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-self.frames:])] += 1


def train_overrides(tmp: Path, clip: Path, extra: list[str], steps: int = 60, batch: int = 64, skip: int = 10,
                    profile_steps: int = 0, sync_report: bool = True) -> list[str]:
    """The `train.py` overrides time_train_py runs: SD1.5 on synthetic 4×32×32 latents (256 px) with trainer=gpu's
    speed settings, StepTimer after `skip` steps, and the optional profile and sync report written under `tmp`."""
    overrides = ["model=unet_sd15", "trainer=gpu", "data=synthetic_latents", "model.vae=null",
                 f"model.conditioner.path={clip}", f"data.batch_size={batch}", f"trainer.max_steps={steps}",
                 "trainer.limit_val_batches=0", "callbacks.export_weights=null", "callbacks.image_grids=null",
                 "+callbacks.step_timer._target_=ldmlab.callbacks.speed.StepTimer",
                 f"+callbacks.step_timer.skip={skip}", f"hydra.run.dir={tmp}/run", *extra]
    if profile_steps:
        overrides += ["+callbacks.step_profile._target_=ldmlab.bench.train_path.StepProfile",
                      "+trainer.profiler._target_=ldmlab.bench.train_path.HookRanges",
                      f"+callbacks.step_profile.out={tmp}/profile.md",
                      f"+callbacks.step_profile.steps={profile_steps}",
                      f"+callbacks.step_profile.skip={steps - profile_steps - 5}"]
    if sync_report:
        overrides += ["+callbacks.sync_report._target_=ldmlab.bench.train_path.SyncReport",
                      f"+callbacks.sync_report.out={tmp}/syncs.txt"]
    return overrides


def time_train_py(extra: list[str], steps: int = 60, batch: int = 64, skip: int = 10,
                  profile_steps: int = 0, sync_report: bool = True) -> dict:
    """img/s of the real entry point; the text encoder is a random CLIP of SD's width (batches carry
    prompt embeddings, so it only encodes the empty prompt for condition dropout). With `profile_steps`, a
    separate concern: the result's "profile" holds StepProfile's Markdown (the timing then includes it).
    `sync_report`: the result's "syncs" lists the host syncs of steps 4-8, before the timed steps."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_tiny_clip(Path(tmp) / "clip768", hidden_size=768)
        overrides = train_overrides(Path(tmp), clip, extra, steps, batch, skip, profile_steps, sync_report)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], capture_output=True, text=True,
                              cwd=REPO, check=False)
        wall = time.perf_counter() - t0
        profiled = Path(tmp, "profile.md").read_text() if profile_steps and Path(tmp, "profile.md").exists() else ""
        syncs = Path(tmp, "syncs.txt").read_text() if Path(tmp, "syncs.txt").exists() else ""
    log = proc.stdout + proc.stderr
    match = STEP_TIME.search(log)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"train.py exited {proc.returncode}: {log[-2000:]}")
    s_per_step = float(match.group(1))
    return {"command": "train.py " + " ".join(o for o in overrides if not o.startswith(("hydra.", "+callbacks",
                                                                                          "model.conditioner"))),
            "img_s": batch / s_per_step, "s_per_step": s_per_step,
            "warmup_s": wall - s_per_step * (steps - skip), "profile": profiled, "syncs": syncs}
