"""Sample quality in the loop (callbacks.sample_quality via eval=<features>) and sweeps that select on it: real
train.py runs of a small LDM on the demo photographs with the no-download VAE-encoder features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_metrics, run_train, series, shared_data_dir
from hydra import compose, initialize_config_dir

from ldmlab.configs import CONF_DIR
from ldmlab.evaluate import evaluate as run_evaluate

pytestmark = pytest.mark.slow

N = 48  # samples per guidance scale: more than the tiny VAE's 40 features, as FD needs


def ldm_eval(vae: Path, stats: Path, *extra: str) -> list[str]:
    return ["model=unet_small", f"model.vae.path={vae}", "eval=vae", "debug=limit", "data.batch_size=4",
            "data.num_workers=0", "trainer.num_sanity_val_steps=0", "model.diffusion.sampler.num_steps=2",
            f"callbacks.sample_quality.n={N}", "callbacks.sample_quality.batch_size=24",
            f"callbacks.sample_quality.stats_dir={stats}", *extra]


@pytest.fixture(scope="module")
def eval_search(tiny_assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hparams_search=ldm_optuna, 2 trials of 6 LDM steps with eval=vae every 3 steps (validation at 3 and 6),
    the reference statistics cached in <sweep>/../stats; the sweep dir."""
    cwd = tmp_path_factory.mktemp("eval_search")
    sweep = cwd / "search"
    run_train(ldm_eval(tiny_assets["vae"], cwd / "stats", "hparams_search=ldm_optuna", "hydra.sweeper.n_trials=2",
                       "hydra.sweeper.sampler.n_startup_trials=2", "callbacks.sample_quality.every_n_steps=3",
                       f"hydra.sweep.dir={sweep}"), cwd=cwd)
    return sweep


@pytest.fixture(scope="module")
def eval_run(eval_search: Path) -> Path:
    """The search's first trial: a 6-step LDM run with the in-loop evaluation at steps 3 and 6 (shared, so the
    module trains once for the in-loop, evaluate and Optuna tests)."""
    return eval_search / "0"


def test_sample_quality_every_n_steps_with_cached_reference(eval_run: Path) -> None:
    """eval/<metric>_g<s> for both guidance scales at steps 3 and 6; the validation images' statistics are
    computed once and cached (with the rows KID and precision/recall need); the first chunk is written as a grid."""
    rows = read_metrics(eval_run)
    for scale in ("1", "3"):
        fid = series(rows, f"eval/fid_g{scale}")
        assert len(fid) == 2 and all(v > 0 for v in fid)
        assert len(series(rows, f"eval/kid_g{scale}")) == 2
        assert all(0 <= v <= 1 for key in ("precision", "recall") for v in series(rows, f"eval/{key}_g{scale}"))
    share = series(rows, "eval/time_share")
    assert len(share) == 2 and all(0 < s < 1 for s in share)
    [cached] = [p for p in (eval_run.parents[1] / "stats").glob("vae-encoder-*_n48_*.safetensors") if ".rows." not in p.name]
    assert cached.with_suffix(".rows.safetensors").exists()
    assert sorted(p.name for p in (eval_run / "eval").glob("*.png")) == [
        "samples_g1_step0000003.png", "samples_g1_step0000006.png",
        "samples_g3_step0000003.png", "samples_g3_step0000006.png"]


def evaluate(args: list[str], cwd: Path, ranks: int = 1) -> subprocess.CompletedProcess:
    """`python -m ldmlab.evaluate <args>` (under torch.distributed.run with `ranks` > 1)."""
    launch = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-port=29533"] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *launch, "-m", "ldmlab.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_evaluate_writes_the_guidance_table_and_resumes_from_its_samples(eval_run: Path, tmp_path: Path,
                                                                         one_thread: None) -> None:
    """The issue's command line (guidance=1,3 as typed): a row per scale, the curve, and a re-run that reads its
    cached samples gives the same numbers; 2 gloo ranks split the samples and agree with 1 (KID's subsets draw
    from rows in rank order, so it is compared loosely)."""
    ckpt = eval_run / "checkpoints" / "last.ckpt"
    common = [f"ckpt={ckpt}", "guidance=1,3", f"n={N}", "batch_size=12", "sampler=ddim", "steps=2", "compile=none",
              f"stats_dir={tmp_path / 'ref'}"]
    out = tmp_path / "one"
    evaluate([*common, f"out={out}"], tmp_path)
    report = (out / "report.md").read_text()
    assert "vae-encoder:" in report and "| 1 |" in report and "| 3 |" in report and "FID" in report
    first = json.loads((out / "results.json").read_text())["rows"]
    assert [r["guidance"] for r in first] == [1.0, 3.0] and all(r["fid"] > 0 for r in first)
    assert (out / "tradeoff.png").stat().st_size > 1000
    assert len(list((out / "samples").rglob("chunk*.pt"))) == 2 * 4
    # every chunk from the cache (in-process, the command line ran above; one thread as its OMP_NUM_THREADS=1, so
    # the features sum in the same order)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[o for o in common if o != "guidance=1,3"] + ["guidance=[1,3]", f"out={out}"])
    assert run_evaluate(cfg) == first and json.loads((out / "results.json").read_text())["rows"] == first
    evaluate([*common, f"out={tmp_path / 'two'}"], tmp_path, ranks=2)
    two = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    for a, b in zip(first, two, strict=True):
        for key in ("fid", "precision", "recall"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert b["kid"] == pytest.approx(a["kid"], abs=0.05)


@pytest.mark.parametrize(("args", "line"), [
    (["n=8"], "set n=41 or more"),
    (["n=48", "metrics=[fid,clip_score]"], ("clip_score scores samples against their prompts, but this model has "
                                           "ClassConditioner, no prompts: drop clip_score from the metrics")),
], ids=["too-few-samples", "text-metric-on-a-class-model"])
def test_evaluate_refuses_before_sampling(args: list[str], line: str, eval_run: Path, tmp_path: Path) -> None:
    """One line naming the setting and the fix; nothing sampled."""
    proc = subprocess.run([sys.executable, "-m", "ldmlab.evaluate", f"ckpt={eval_run / 'checkpoints' / 'last.ckpt'}",
                           *args, f"out={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 1 and line in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "samples").exists()


def test_optuna_selects_on_the_in_loop_fid(eval_search: Path) -> None:
    """hparams_search=ldm_optuna, 2 trials: each trial's objective is the eval/fid_g1 it logged last, and the
    study's best is the smaller of the two."""
    result = yaml.safe_load((eval_search / "optimization_results.yaml").read_text())
    trials = sorted(p for p in eval_search.iterdir() if p.is_dir() and p.name.isdigit())
    fids = [series(read_metrics(t), "eval/fid_g1")[-1] for t in trials]
    assert len(trials) == 2 and fids[0] != fids[1]
    assert result["best_value"] == pytest.approx(min(fids), rel=1e-6)


def test_missing_inception_weights_stop_before_training(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """eval=inception without the file: one line naming features.path and where the weights come from."""
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}",
           "model=unet_small", f"model.vae.path={tiny_assets['vae']}", "eval=inception", "debug=limit",
           "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr + proc.stdout
    assert "features.path" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
