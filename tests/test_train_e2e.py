"""`python train.py model=vae_tiny ...` end to end in a subprocess, on the embedded demo photographs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, series
from safetensors import safe_open
from safetensors.torch import load_file

from ldmlab.nn.autoencoder import AutoencoderKL

pytestmark = pytest.mark.slow


def test_reconstruction_loss_drops(vae_run: Path) -> None:
    rec = series(read_metrics(vae_run), "train/rec_loss")
    assert len(rec) >= 25
    first, last = sum(rec[:3]) / 3, sum(rec[-3:]) / 3
    assert last < 0.6 * first, f"rec loss {first:.3f} -> {last:.3f}: less than a 40% drop"


def test_validation_metrics_logged_and_improve(vae_run: Path) -> None:
    rows = read_metrics(vae_run)
    psnr = series(rows, "val/psnr")
    assert len(psnr) == 3 and psnr[-1] > psnr[0], psnr
    for key in ["val/ssim", "val/lpips", "val/rec_loss", "train/d_loss", "train/g_loss", "train/d_weight"]:
        assert series(rows, key), f"{key} never logged"


def test_artefacts_in_run_dir(vae_run: Path) -> None:
    assert (vae_run / "checkpoints" / "last.ckpt").exists()
    assert len(list((vae_run / "checkpoints").glob("step*.ckpt"))) == 1  # best by val/psnr
    assert sorted(p.name for p in (vae_run / "images").glob("*.png")) == [
        "reconstructions_step0000025.png", "reconstructions_step0000050.png", "reconstructions_step0000075.png"]
    assert (vae_run / ".hydra" / "config.yaml").exists()


def test_exported_safetensors_equal_last_checkpoint(vae_run: Path) -> None:
    path = vae_run / "export" / "vae.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    vae = AutoencoderKL(**config)
    vae.load_state_dict(load_file(str(path)))
    ckpt = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, tensor in vae.state_dict().items():
        torch.testing.assert_close(tensor, ckpt["state_dict"][f"autoencoder.{name}"], rtol=0, atol=0)


def test_all_loggers_offline_and_multirun(vae_sweep: tuple[Path, str]) -> None:
    """`-m` runs one job per point, each with its own run dir; W&B logs offline without a key; TB gets images."""
    sweep, output = vae_sweep
    assert "wandb sync" in output
    for job in ("0", "1", "2", "3"):
        run_dir = sweep / job
        assert list((run_dir / "wandb").glob("offline-run-*")), f"no offline W&B run in {run_dir}"
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert series(read_metrics(run_dir), "val/psnr")
    kl_weights = [(sweep / j / ".hydra" / "overrides.yaml").read_text() for j in ("0", "2")]
    assert "model.loss.kl_weight=1e-06" in kl_weights[0] and "model.loss.kl_weight=1e-05" in kl_weights[1]
