"""The GPU benchmark's CPU-testable parts: its help names the train.py-vs-bare-step run, the variants it runs
by default parse, and the overrides of the train.py path compose into the run it times (the timing itself
needs a GPU: python -m ldmlab.bench.gpu → docs/BENCHMARKS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

from ldmlab.bench import gpu, unet
from ldmlab.bench.train_path import HookRanges, StepProfile, SyncReport, train_overrides
from ldmlab.callbacks.speed import GPUSpeed, StepTimer
from ldmlab.configs import CONF_DIR


def test_help_says_how_to_run_the_training_path_against_the_bare_step(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu.main(["--help"])
    text = capsys.readouterr().out
    variant, case = gpu.BARE.split("@")
    assert f"--parts unet,train --cases {case} --variants {variant}" in text and '--train-extras ""' in text
    assert "train.py model=unet_sd15 trainer=gpu\ndata=synthetic_latents: 256 px, batch 64" in text
    assert case == "256x64" and unet.parse_variant(variant) == ("ours", {"cl", "compile", "ro", "cudnn_sdpa"})


def test_default_variants_parse_and_qkv_is_gone() -> None:
    for variant in (*gpu.DEFAULT_VARIANTS, "ours+cl+regional+graph", "ours+cl+compile+ma+mag+c1x1+cdt+bench"):
        unet.parse_variant(variant)
    with pytest.raises(ValueError, match=r"variant 'ours\+qkv': impl ours\|diffusers, features from"):
        unet.parse_variant("ours+qkv")  # measured without effect; removed (docs/BENCHMARKS.md)


def test_train_rows_compare_with_the_bare_step() -> None:
    row = {"command": "train.py x", "img_s": 570.0, "s_per_step": 0.1123, "warmup_s": 200.4}
    assert gpu.train_row(row, 586.0) == "| `train.py x` | 570.0 | 0.973 | 0.1123 | 200 |"
    assert gpu.train_row(row, None) == "| `train.py x` | 570.0 | – | 0.1123 | 200 |"


def test_train_path_overrides_compose_into_the_timed_run(tmp_path: Path) -> None:
    """SD1.5 on 4×32×32 synthetic latents (256 px), batch 64, trainer=gpu's speed callback, StepTimer, the sync
    report and the profiler: each override exists in the config tree and each callback instantiates."""
    overrides = train_overrides(tmp_path, tmp_path / "clip", ["speed=none"], steps=60, profile_steps=5)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert get_class(cfg.model._target_).__name__ == "LatentDiffusionModule" and cfg.model.vae is None
    assert cfg.model.conditioner.path == str(tmp_path / "clip")
    assert (list(cfg.data.shape), cfg.data.batch_size, cfg.data.kind) == ([4, 32, 32], 64, "latent")
    assert (cfg.trainer.max_steps, cfg.trainer.limit_val_batches, cfg.trainer.precision) == (60, 0, "bf16-mixed")
    assert "_target_" not in cfg.callbacks.speed  # the extra `speed=none` row; the default row has GPUSpeed:
    defaults = train_overrides(tmp_path, tmp_path / "clip", [], sync_report=False)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        speed = compose("train", overrides=defaults).callbacks.speed
    assert isinstance(instantiate(speed), GPUSpeed) and not any("sync_report" in o for o in defaults)
    timer = instantiate(cfg.callbacks.step_timer)
    assert isinstance(timer, StepTimer) and timer.skip == 10
    assert isinstance(instantiate(cfg.callbacks.sync_report), SyncReport)
    profile = instantiate(cfg.callbacks.step_profile)
    assert isinstance(profile, StepProfile) and (profile.skip, profile.steps) == (50, 5)
    assert isinstance(instantiate(cfg.trainer.profiler), HookRanges)
