"""The training path users run, timed: `train.py model=unet_sd15 trainer=gpu data=synthetic_latents` in a
subprocess (Hydra composition, Lightning loop, EMA, logging), steady-state seconds per step from StepTimer."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ldmlab.utils.stand_ins import make_tiny_clip

REPO = Path(__file__).resolve().parents[3]
STEP_TIME = re.compile(r"StepTimer: ([0-9.]+) s/step")


def time_train_py(extra: list[str], steps: int = 60, batch: int = 64, skip: int = 10) -> dict:
    """img/s of the real entry point; the text encoder is a random CLIP of SD's width (batches carry
    prompt embeddings, so it only encodes the empty prompt for condition dropout)."""
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_tiny_clip(Path(tmp) / "clip768", hidden_size=768)
        overrides = ["model=unet_sd15", "trainer=gpu", "data=synthetic_latents", "model.vae=null",
                     f"model.conditioner.path={clip}", f"data.batch_size={batch}", f"trainer.max_steps={steps}",
                     "trainer.limit_val_batches=0", "callbacks.export_weights=null", "callbacks.image_grids=null",
                     "+callbacks.step_timer._target_=ldmlab.callbacks.speed.StepTimer",
                     f"+callbacks.step_timer.skip={skip}", f"hydra.run.dir={tmp}/run", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], capture_output=True, text=True,
                              cwd=REPO, check=False)
        wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    match = STEP_TIME.search(log)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"train.py exited {proc.returncode}: {log[-2000:]}")
    s_per_step = float(match.group(1))
    return {"command": "train.py " + " ".join(o for o in overrides if not o.startswith(("hydra.", "+callbacks",
                                                                                          "model.conditioner"))),
            "img_s": batch / s_per_step, "s_per_step": s_per_step,
            "warmup_s": wall - s_per_step * (steps - skip)}
