"""Sweeps on the CPU: a `-m` grid runs one job (and one W&B run, grouped) per point; Optuna maximises train()'s metric."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, read_offline_wandb, run_train

pytestmark = pytest.mark.slow


def wandb_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run under `run_dir/wandb`, oldest first."""
    return [read_offline_wandb(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]


def logged_steps(run: dict, key: str) -> list[int]:
    """`trainer/global_step` of every history row of `run` that has `key`."""
    return [int(row["trainer/global_step"]) for row in run["history"] if key in row]


def last_metric(run_dir: Path, key: str) -> float:
    """The last logged value of `key` in the run's CSV metrics."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)][-1]


def global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def test_grid_runs_four_jobs_each_its_own_wandb_run_in_one_group(vae_sweep: tuple[Path, str]) -> None:
    """`-m` with two values of two params: four jobs, four run dirs, four W&B runs in the sweep's group."""
    sweep, _ = vae_sweep
    jobs = [sweep / str(n) for n in range(4)]
    points = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        points.add(tuple(o for o in overrides if o.startswith(("model.loss.kl_weight=", "optimizer.lr="))))
        assert global_step(job / "checkpoints" / "last.ckpt") == 6
        assert last_metric(job, "val/psnr") > 0
    assert points == set(itertools.product(["model.loss.kl_weight=1e-06", "model.loss.kl_weight=1e-05"],
                                           ["optimizer.lr=0.0002", "optimizer.lr=0.0005"]))
    runs = [wandb_runs(job) for job in jobs]
    assert [len(r) for r in runs] == [1, 1, 1, 1]
    ids = [r[0]["id"] for r in runs]
    assert len(set(ids)) == 4 and ids == [(job / "wandb_id.txt").read_text().strip() for job in jobs]
    assert {r[0]["group"] for r in runs} == {"debug-grid"}  # <task_name>-<sweep dir name>
    assert [r[0]["name"] for r in runs] == ["debug-0", "debug-1", "debug-2", "debug-3"]
    for job, r in zip(jobs, runs):  # tags from the config, then the job's overrides
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert r[0]["tags"][0] == "dev" and {o for o in overrides if len(o) <= 64} <= set(r[0]["tags"])
    assert all(logged_steps(r[0], "val/psnr") == [2, 5] for r in runs)


def test_optuna_search_maximises_what_train_returns(tmp_path: Path) -> None:
    """hparams_search=vae_optuna: every trial's objective is its val/psnr; the best is the largest."""
    sweep = tmp_path / "search"
    run_train(["hparams_search=vae_optuna", *TINY, "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
               f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 3
    psnr = [last_metric(t, "val/psnr") for t in trials]
    assert result["best_value"] == pytest.approx(max(psnr), rel=1e-6)
    best = trials[psnr.index(max(psnr))]
    chosen = dict(o.split("=", 1) for o in yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text()))
    assert set(result["best_params"]) == {"optimizer.lr", "model.loss.kl_weight", "model.loss.perceptual_weight"}
    for key, value in result["best_params"].items():
        assert float(chosen[key]) == pytest.approx(float(value))
    assert 5e-5 <= float(result["best_params"]["optimizer.lr"]) <= 1e-3


def test_ldm_grid_over_schedules_and_channel_mults(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """The issue's LDM sweep: 2 noise schedules × 2 U-Net channel_mult lists = four jobs, each trained to step 6."""
    sweep = tmp_path / "ldm"
    run_train(["-m", "model=unet_small", f"model.vae.path={tiny_assets['vae']}",
               "model/diffusion/noise_schedule=scaled_linear,cosine", "model.unet.channel_mult=[1,2,2],[1,2,4]", "debug=limit",
               "data.batch_size=4", "data.num_workers=0", "model.diffusion.sampler.num_steps=2",
               f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    points = set()
    for job in jobs:
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        schedule = next(o.split("=", 1)[1] for o in overrides if o.startswith("model/diffusion/noise_schedule="))
        mult = next(o.split("=", 1)[1] for o in overrides if o.startswith("model.unet.channel_mult="))
        assert cfg["model"]["unet"]["channel_mult"] == yaml.safe_load(mult)
        assert cfg["model"]["diffusion"]["noise_schedule"]["_target_"] == f"ldmlab.diffusion.schedules.{schedule}"
        points.add((schedule, mult))
        assert global_step(job / "checkpoints" / "last.ckpt") == 6
    assert points == set(itertools.product(["scaled_linear", "cosine"], ["[1,2,2]", "[1,2,4]"]))
