"""pipeline=variants_gpu | variants | variants_tiny (issue 22's comparison): the budget between variants, the override
order, the table, the config check before any stage; every variant composes and builds what its overrides say;
end to end on the CPU (variants_tiny): one variant per run under a zero budget, then the rest, one table row each."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import hydra
import pytest
from conftest import REPO, shared_data_dir
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from test_pipeline import run_pipeline_cli

from ldmlab.pipeline.run import StageMismatch, resolve_dir, run_pipeline
from ldmlab.pipeline.variants import Budget, Comparison, variant_overrides
from ldmlab.pipeline.variants_table import write_table
from ldmlab.validate import ConfigError, check_config

# the override strings live in one file (renamed there alone, issue 18): tests read them from it
RUNS = OmegaConf.load(REPO / "conf" / "pipeline" / "variant_set" / "issue22.yaml")
VARIANTS = ["baseline", "v", "x0", "min_snr", "zero_snr", "cosine", "flow", "learned_variance", "adm"]


def pipeline_cfg(preset: str, root: Path, *overrides: str) -> DictConfig:
    """conf/pipeline.yaml with `pipeline=<preset>` as `python -m ldmlab.pipeline` composes it, dir = root (inside an
    initialized Hydra)."""
    cfg = compose("pipeline", overrides=[f"pipeline={preset}", f"dir={root}", *overrides])
    resolve_dir(cfg)
    return cfg


def comparison(preset: str, root: Path, *overrides: str) -> Comparison:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # the stages compose too
        return Comparison(pipeline_cfg(preset, root, *overrides), root)


# ---------------------------------------------------------------- budget, overrides


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_stops_between_variants_by_the_longest_finished_one() -> None:
    clock = Clock()
    budget = Budget(seconds=500, clock=clock)
    clock.now += 600  # the shared stages took longer than the budget: the first variant of a run starts anyway
    assert budget.allows([])
    budget.started = 1
    clock.now = 1000 + 250  # 250 s in
    assert not budget.allows([100.0, 260.0])  # 250 + the longest finished (260) does not fit in 500
    assert budget.allows([100.0, 250.0])  # exactly 500 does
    assert Budget(seconds=None, clock=clock).allows([1e9])  # no limit


def test_variant_overrides_put_the_users_last(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = pipeline_cfg("variants_tiny", tmp_path, 'common=["trainer.log_every_n_steps=3"]')
    ov = variant_overrides(cfg, "flow")
    flow = ov.index(RUNS.flow[0])
    assert ov[:flow] == [str(o) for o in cfg.ldm.overrides]  # the preset's LDM, as pipeline=variants's ldm stage
    assert flow < ov.index("callbacks.image_grids=null") < ov.index("model.unet.model_channels=32")  # each, extra
    assert ov[-2:] == ["trainer.log_every_n_steps=3", "task_name=variants_tiny_flow"]


# ---------------------------------------------------------------- the table


def fake_variant(acc1: float, acc4: float, fid: float, img_per_s: float | None) -> dict:
    sets = {"reconstructions": {"fid": 1.5, "kid": 0.01}, "g1": {"fid": 2 * fid, "kid": 0.2},
            "g4": {"fid": fid, "kid": fid / 100}}
    return {"ldm": {"steps": 800, "batch_size": 128, "device": "cuda: NVIDIA H200 (bf16-mixed)", "train_loss": 0.06,
                    "val_loss": 0.059, "img_per_s": img_per_s, "seconds": 150.0, "timer_skip": 50},
            "samples": {"guidance": [{"scale": 1.0, "accuracy": acc1, "grid": "samples/grid_g1.png"},
                                     {"scale": 4.0, "accuracy": acc4, "grid": "samples/grid_g4.png"}],
                        "sampler": "ddim_sample", "steps": 50, "per_class": 50, "seconds": 7.0,
                        "domain": {"features": "classifier:classifier", "reference_n": 1000, "sets": sets}}}


def test_table_has_a_row_per_variant_and_bolds_each_columns_best(tmp_path: Path) -> None:
    results = {"vae": {"f": 4, "val_psnr": 26.84}, "latents": {"train_samples": 20000, "latent_shape": [4, 16, 16]},
               "classifier": {"val_accuracy": 0.862},
               "variants": {"baseline": fake_variant(0.562, 0.956, 25.0, 1800.0),
                            "flow": fake_variant(0.70, 0.94, 21.5, None)},
               "pending": ["adm"], "overrides": {"baseline": [], "flow": ["model/diffusion/prediction=flow"]}}
    text = write_table(tmp_path, results, "unit").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert len(rows) == 2
    assert rows[0].startswith("| **baseline** | (the preset's LDM) | ddim 50 | 56.2 % | **95.6 %** | 25 | 0.25 |")
    assert "| 0.0600 | 0.0590 | **1800** | 150 | [g=4](variants/baseline/samples/grid_g4.png) |" in rows[0]
    assert rows[1].startswith("| **flow** | `model/diffusion/prediction=flow` | ddim 50 | **70.0 %** | 94.0 % | **21.5** | "
                              "**0.215** |") and "| n/a |" in rows[1]  # no timed step: n/a, not a number
    assert ("Best — class accuracy at g=1: flow (70.0 %); class accuracy at g=4: baseline (95.6 %); FID: flow (21.5); "
            "KID: flow (0.215); img/s: baseline (1800).") in text
    assert "Pending (not trained yet: run the same command again): adm." in text
    assert "800 steps × batch 128 on cuda: NVIDIA H200" in text and "score FID 1.5, the floor" in text
    assert "seconds per step of the train.py loop after its first 50 steps" in text


# ---------------------------------------------------------------- configs


def test_every_variant_composes_and_builds_what_it_says(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """Each override set of conf/pipeline/variant_set/issue22.yaml reaches the LatentDiffusionModule it names."""
    comp = comparison("variants", tmp_path)
    assert list(comp.configs) == VARIANTS
    built = {}
    for name, (_, cfg) in comp.configs.items():
        assert cfg.model.vae.path == f"{tmp_path}/vae/export/vae.safetensors" and cfg.data.root == f"{tmp_path}/latents"
        assert cfg.callbacks.image_grids is None and cfg.callbacks.step_timer.path.endswith(f"{name}/ldm/step_time.json")
        with open_dict(cfg):
            cfg.model.vae.path = str(tiny_assets["vae"])  # no VAE stage ran: a stand-in with the demo's 4 channels
        built[name] = hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))
    kind = {n: (type(m.diffusion.prediction).__name__, type(m.diffusion.variance).__name__,
                m.diffusion.sampler.func.__name__) for n, m in built.items()}
    assert kind["baseline"] == kind["min_snr"] == kind["cosine"] == kind["adm"] == ("EpsPrediction", "FixedVariance",
                                                                                      "ddim_sample")
    assert kind["v"] == kind["zero_snr"] == ("VPrediction", "FixedVariance", "ddim_sample") and kind["x0"][0] == "X0Prediction"
    assert kind["flow"] == ("FlowMatching", "FixedVariance", "flow_euler_sample")
    assert built["flow"].diffusion.prediction.density == "logit_normal"
    assert kind["learned_variance"] == ("EpsPrediction", "LearnedVariance", "ddpm_sample")
    assert built["learned_variance"].unet.config["out_channels"] == 2 * built["baseline"].unet.config["out_channels"]
    assert built["min_snr"].train_cfg.loss_weighting == "min_snr" and built["baseline"].train_cfg.loss_weighting == "uniform"
    zero, base = (built[k].diffusion.noise_schedule for k in ("zero_snr", "baseline"))
    assert float(zero.alphas_cumprod[-1]) == 0.0 < float(base.alphas_cumprod[-1])
    assert built["zero_snr"].diffusion.sampler.keywords["spacing"] == "trailing"
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in (0, 1)]  # Nichol & Dhariwal eq. 17
    assert float(built["cosine"].diffusion.noise_schedule.alphas_cumprod[0]) == pytest.approx(f[1] / f[0], rel=1e-9)
    assert built["cosine"].diffusion.noise_schedule.name == "cosine"
    adm = built["adm"].unet.config
    assert adm["resnet_time_scale_shift"] == "scale_shift" and adm["resblock_updown"] and adm["head_dim"] == 64


def test_gpu_preset_shares_one_vae_and_judge_and_fits_its_budget(tmp_path: Path) -> None:
    comp = comparison("variants_gpu", tmp_path)
    cfg = comp.cfg
    assert list(comp.configs) == VARIANTS and cfg.vae.steps == 1000 and cfg.variants.budget_s <= 540
    for _, ldm in comp.configs.values():
        assert ldm.trainer.accelerator == "gpu" and ldm.trainer.precision == "bf16-mixed"
        assert ldm.trainer.max_steps == cfg.ldm.steps == ldm.trainer.val_check_interval  # one validation, at the end
        assert ldm.model.vae.path == f"{tmp_path}/vae/export/vae.safetensors" and ldm.data.batch_size == 128
    assert cfg.variants.timer_skip < cfg.ldm.steps


def test_bad_variants_are_refused_before_any_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        comparison("variants_tiny", tmp_path, f'variants.runs.v=["{RUNS.v[0]}v"]',  # model/diffusion/prediction=vv
                   f'variants.runs.flow=["{RUNS.flow[0]}"]',  # flow matching without its sampler
                   "variants.timer_skip=4", "variants.budget_s=-1")
    lines = error.value.problems
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    assert lines[0] == "variants.budget_s=-1 must be >= 0 seconds, or null for no limit"
    assert lines[1] == "variants.timer_skip=4 leaves no timed step of ldm.steps=4: set variants.timer_skip to 0..3"
    assert lines[2].startswith("variants.runs.v: ") and f"Could not find '{RUNS.v[0].replace('=', '/')}v'" in lines[2]
    assert "eps flow v x0" in lines[2]
    assert lines[3].startswith("variants.runs.flow: ") and "=ddim cannot sample the flow-matching objective" in lines[3]
    assert not (tmp_path / "vae").exists()  # refused before the first stage


def test_check_without_files_leaves_out_missing_inputs(tmp_path: Path) -> None:
    """The config check of a stage whose inputs a pipeline has not written yet: the missing VAE and latents are
    not problems then; the same config checked for train.py names them."""
    comp = comparison("variants_tiny", tmp_path)
    _, cfg = comp.configs["baseline"]
    assert check_config(cfg, files=False) == []
    with_files = check_config(cfg)
    assert any(line.startswith("model.vae.path") for line in with_files), with_files


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_comparison_runs_one_variant_per_zero_budget_run_then_the_rest(tmp_path: Path) -> None:
    """variants_tiny end to end on the CPU, as the GPU calls run it: a run whose budget is spent stops after its
    first variant (the shared stages and that variant stay on disk), the same command finishes the others, skipping
    what is done; the table has one row per variant with finite numbers."""
    root = tmp_path / "pipe"
    first = run_pipeline_cli(root, tmp_path, "pipeline=variants_tiny", "variants.budget_s=0", tiny=False)
    assert "8 variant(s) left (v, x0, min_snr, zero_snr, cosine, flow, learned_variance, adm)" in first
    results = json.loads((root / "results.json").read_text())
    assert list(results["variants"]) == ["baseline"] and len(results["pending"]) == 8
    second = run_pipeline_cli(root, tmp_path, "pipeline=variants_tiny", tiny=False)
    assert all(f"[{s}] done before" in second for s in ("vae", "latents", "classifier"))
    assert re.search(r"\[variant baseline\].*\n.*\[ldm\] done before.*\n.*\[samples\] done before", second)
    assert "[variant adm] model.unet." in second
    assert f"report: {root / 'variants.md'}" in second
    results = json.loads((root / "results.json").read_text())
    assert list(results["variants"]) == VARIANTS and results["pending"] == []
    text = (root / "variants.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| **")]
    assert [re.match(r"\| \*\*(\w+)\*\*", r).group(1) for r in rows] == VARIANTS
    for row in rows:  # class accuracy ×2, FID, KID, train loss, val loss, img/s, seconds: finite numbers
        cells = row.split(" | ")[3:-1]
        numbers = [float(c.strip("*% ")) for c in cells]
        assert len(numbers) == 8 and all(math.isfinite(x) for x in numbers), row
    for v in results["variants"].values():
        assert v["ldm"]["timed_steps"] == 3 and v["ldm"]["img_per_s"] > 0  # 4 steps, the first untimed
    assert not (root / "variants" / "baseline" / "ldm" / "images").exists()  # variants.each: no grids in training
    # a finished variant whose overrides changed is refused, naming what to delete, before anything trains (in
    # this process: the command line ran twice above)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), \
            pytest.raises(StageMismatch) as refused:
        run_pipeline(pipeline_cfg("variants_tiny", root, f'variants.runs.v=["{RUNS.x0[0]}"]', f"paths.root_dir={tmp_path}",
                                  f"paths.data_dir={shared_data_dir()}"))
    assert f"rm -r {root / 'variants' / 'v' / 'ldm'} {root / 'variants' / 'v' / 'samples'}" in str(refused.value)
