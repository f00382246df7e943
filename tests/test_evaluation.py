"""Sample quality in the loop (callbacks.sample_quality via eval=<features>) and sweeps that select on it: real
train.py runs of a small LDM on the demo photographs with the no-download VAE-encoder features."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, run_train, series

pytestmark = pytest.mark.slow

N = 48  # samples per guidance scale: more than the tiny VAE's 40 features, as FD needs


def ldm_eval(vae: Path, stats: Path, *extra: str) -> list[str]:
    return ["model=unet_small", f"model.vae.path={vae}", "eval=vae", "debug=limit", "data.batch_size=4",
            "data.num_workers=0", "trainer.num_sanity_val_steps=0", "model.sampler.num_steps=2",
            f"callbacks.sample_quality.n={N}", "callbacks.sample_quality.batch_size=24",
            f"callbacks.sample_quality.stats_dir={stats}", *extra]


def test_sample_quality_every_n_steps_with_cached_reference(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """every_n_steps=3 with validation at 3 and 6: eval/<metric>_g<s> for both guidance scales at both; the
    validation images' statistics are computed once and cached; the first chunk is written as a grid."""
    run, stats = tmp_path / "run", tmp_path / "stats"
    run_train(ldm_eval(tiny_assets["vae"], stats, "callbacks.sample_quality.every_n_steps=3",
                       f"hydra.run.dir={run}"), cwd=tmp_path)
    rows = read_metrics(run)
    for scale in ("1", "3"):
        fid = series(rows, f"eval/fid_g{scale}")
        assert len(fid) == 2 and all(v > 0 for v in fid)
        assert len(series(rows, f"eval/kid_g{scale}")) == 2
        assert all(0 <= v <= 1 for key in ("precision", "recall") for v in series(rows, f"eval/{key}_g{scale}"))
    share = series(rows, "eval/time_share")
    assert len(share) == 2 and all(0 < s < 1 for s in share)
    [cached] = [p for p in stats.glob("vae-encoder-*_n48_*.safetensors") if ".rows." not in p.name]
    assert cached.with_suffix(".rows.safetensors").exists()  # KID and precision/recall need the rows
    assert sorted(p.name for p in (run / "eval").glob("*.png")) == [
        "samples_g1_step0000003.png", "samples_g1_step0000006.png",
        "samples_g3_step0000003.png", "samples_g3_step0000006.png"]


def test_optuna_selects_on_the_in_loop_fid(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """hparams_search=ldm_optuna, 2 trials: each trial's objective is the eval/fid_g1 it logged last, and the
    study's best is the smaller of the two."""
    sweep = tmp_path / "search"
    run_train(ldm_eval(tiny_assets["vae"], tmp_path / "stats", "hparams_search=ldm_optuna",
                       "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                       "callbacks.sample_quality.every_n_steps=6", f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    fids = [series(read_metrics(t), "eval/fid_g1")[-1] for t in trials]
    assert len(trials) == 2 and fids[0] != fids[1]
    assert result["best_value"] == pytest.approx(min(fids), rel=1e-6)


def test_missing_inception_weights_stop_before_training(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """eval=inception without the file: one line naming features.path and where the weights come from."""
    import subprocess
    import sys

    from conftest import REPO, shared_data_dir

    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}",
           "model=unet_small", f"model.vae.path={tiny_assets['vae']}", "eval=inception", "debug=limit",
           "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr + proc.stdout
    assert "features.path" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
