"""ldmlab.pipeline: the classifier's accuracy, the report writer, stage skipping (fast); the whole chain end to
end with tiny step counts, then a restart that skips finished stages and resumes an unfinished one (slow)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_data_dir
from PIL import Image

from ldmlab.nn.classifier import SmallCNN
from ldmlab.pipeline.classifier import class_accuracy, predict, sample_labels
from ldmlab.pipeline.report import smooth, write_report
from ldmlab.pipeline.run import StageMismatch, dependents, run_pipeline, run_stage
from ldmlab.utils.images import labelled_grid

NAMES = ["ant", "bee", "cow"]

# ---------------------------------------------------------------- classifier


def test_class_accuracy_overall_and_per_class() -> None:
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 2, 1, 1, 0, 2])
    acc = class_accuracy(predicted, target, num_classes=4)
    assert acc["accuracy"] == pytest.approx(5 / 8)
    assert acc["per_class"] == [pytest.approx(0.5), 1.0, 0.5, None]  # class 3 never asked for: no number


def test_class_accuracy_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        class_accuracy(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2)


def test_sample_labels_are_one_row_per_class() -> None:
    assert sample_labels(3, 2) == [0, 0, 1, 1, 2, 2]


def test_predict_takes_uint8_pixels_or_float_images() -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, width=4, depth=2).eval()
    pixels = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(predict(model, pixels, batch_size=2), predict(model, images))
    assert SmallCNN(num_classes=3, width=4, depth=2)(images).shape == (5, 3)


# ---------------------------------------------------------------- report pieces


def test_labelled_grid_has_one_row_per_name() -> None:
    images = torch.zeros(len(NAMES) * 4, 3, 8, 8)
    grid = labelled_grid(images, NAMES, columns=4, scale=2)
    assert grid.height == 2 * (len(NAMES) * (8 + 2) + 2)
    with pytest.raises(ValueError, match="do not make 3 rows of 5"):
        labelled_grid(images, NAMES, columns=5)


def test_smooth_takes_window_means() -> None:
    assert smooth([(1, 1.0), (2, 3.0), (3, 5.0)], 2) == [(2, 2.0)]
    assert smooth([(1, 1.0)], 1) == [(1, 1.0)]


def fake_results() -> dict:
    per = [0.9, 0.5, None]
    return {
        "vae": {"f": 4, "latent_shape": [4, 8, 8], "image_size": 32, "params": 954_567, "val_psnr": 24.25,
                "val_ssim": 0.8123, "steps": 100, "batch_size": 16, "train_samples": 30, "val_samples": 9,
                "class_names": NAMES, "reconstructions": "vae/images/r.png", "seconds": 60.0},
        "latents": {"dir": "latents", "latent_shape": [4, 8, 8], "train_samples": 30, "val_samples": 9,
                    "seconds": 6.0},
        "ldm": {"steps": 50, "batch_size": 8, "params": 3_720_000, "p_uncond": 0.1, "train_loss": 0.3456,
                "val_loss": float("nan"), "latent_scale": 0.5, "loss_curve": "ldm_loss.png",
                "device": "cpu (32-true)", "seconds": 120.0},
        "classifier": {"params": 290_000, "epochs": 3, "train_samples": 30, "val_samples": 9, "val_accuracy": 0.875,
                       "val_per_class": per, "recon_accuracy": 0.75, "recon_per_class": per, "seconds": 10.0},
        "samples": {"guidance": [{"scale": 1.0, "n": 6, "accuracy": 0.5, "per_class": per, "grid": "samples/g1.png"},
                                 {"scale": 4.0, "n": 6, "accuracy": 2 / 3, "per_class": per,
                                  "grid": "samples/g4.png"}],
                    "per_class": 2, "grid_columns": 2, "steps": 10, "sampler": "ddim_sample", "seconds": 4.0,
                    "domain": {"features": "classifier:classifier", "reference_n": 9, "sets": {
                        "reconstructions": {"fid": 1.5, "kid": 0.01, "kid_std": 0.002, "precision": 0.9, "recall": 0.8},
                        "g1": {"fid": 12.25, "kid": 0.2, "kid_std": 0.03, "precision": 0.5, "recall": 0.25}}}},
    }


def test_report_shows_every_number(tmp_path: Path) -> None:
    text = write_report(tmp_path, fake_results(), title="unit").read_text()
    for expected in ["**4** (32×32×3 pixels → 8×8×4 latents)", "**24.25 dB**", "**0.812**", "0.95 M",
                     "| held-out real crops | 9 | **87.5 %** |", "| VAE reconstructions of those crops | 9 | 75.0 % |",
                     "| samples, guidance 1 | 6 | **50.0 %** |", "| samples, guidance 4 | 6 | **66.7 %** |",
                     "| cow | n/a | n/a | n/a | n/a |", "val loss n/a", "train loss (mean of the last 10 logs) 0.346",
                     "![LDM loss](ldm_loss.png)", "![samples at guidance 4](samples/g4.png)", "3.3 min",
                     "| VAE reconstructions of the held-out crops | **1.5** | 0.01 ± 0.002 | 0.90 | 0.80 |",
                     "| samples, guidance 1 | **12.2** | 0.2 ± 0.03 | 0.50 | 0.25 |", "`classifier:classifier`"]:
        assert expected in text, expected


# ---------------------------------------------------------------- stages: skip, refuse


def test_finished_stage_is_skipped_and_changed_settings_refused(tmp_path: Path) -> None:
    calls = []

    def fn(out: Path) -> dict:
        calls.append(out)
        return {"value": 1.5, "shape": (4, 8, 8)}

    first = run_stage(tmp_path / "ldm", {"steps": 3, "after": {}}, fn)
    again = run_stage(tmp_path / "ldm", {"steps": 3, "after": {}}, fn)
    assert len(calls) == 1 and again == first and first["shape"] == [4, 8, 8] and first["seconds"] >= 0
    with pytest.raises(StageMismatch, match=r"different \['steps'\].*rm -r \S+/ldm \S+/samples"):
        run_stage(tmp_path / "ldm", {"steps": 4, "after": {}}, fn)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "spec.json").write_text('{"steps": 1}')  # half-finished with other settings
    with pytest.raises(StageMismatch, match="different"):
        run_stage(tmp_path / "vae", {"steps": 2}, fn)
    assert dependents("vae") == ["latents", "ldm", "classifier", "samples"]


def test_stage_seconds_count_every_attempt(tmp_path: Path) -> None:
    """A stage stopped by a signal (SystemExit from the Preemption callback) and finished by a re-run reports
    the time of both attempts, not only the last one's."""
    def interrupted(out: Path) -> dict:
        time.sleep(0.3)
        raise SystemExit(0)

    def finishing(out: Path) -> dict:
        time.sleep(0.1)
        return {}

    with pytest.raises(SystemExit):
        run_stage(tmp_path / "ldm", {"steps": 3}, interrupted)
    assert not (tmp_path / "ldm" / "result.json").exists()
    result = run_stage(tmp_path / "ldm", {"steps": 3}, finishing)
    assert 0.4 <= result["seconds"] < 5.0


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "pipeline").glob("*.yaml")))
def test_preset_stages_compose_and_fit_together(preset: str, tmp_path: Path) -> None:
    """Every preset's training stages compose as train.py runs; the U-Net reads the VAE's latent channels."""
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ldmlab.pipeline.run import overrides, resolve_dir
    from ldmlab.pipeline.stages import compose_stage

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("pipeline", overrides=[f"pipeline={preset}", f"dir={tmp_path}"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
        resolve_dir(cfg)
        vae = compose_stage(cfg, tmp_path / "vae", overrides(cfg, "vae"))
        ldm = compose_stage(cfg, tmp_path / "ldm", overrides(cfg, "ldm"))
    autoencoder = hydra.utils.instantiate(vae.model.autoencoder)
    assert autoencoder.downsample_factor >= 4 and vae.data.source._target_.endswith("DemoShards")
    assert ldm.model.unet.in_channels == autoencoder.embed_dim and ldm.data.decoder._target_.endswith("LatentDecoder")
    assert ldm.model.vae.path == f"{tmp_path}/vae/export/vae.safetensors" and ldm.data.root == f"{tmp_path}/latents"
    assert ldm.model.training.p_uncond > 0 and ldm.model.conditioner.num_classes == 10
    assert vae.trainer.max_steps == cfg.vae.steps and ldm.trainer.max_steps == cfg.ldm.steps
    assert vae.paths.output_dir == str(tmp_path / "vae")
    if preset.endswith("gpu"):
        assert vae.trainer.precision == ldm.trainer.precision == "bf16-mixed"
        assert vae.trainer.accelerator == ldm.trainer.accelerator == "gpu" and vae.data.source.crop_size == 64


# ---------------------------------------------------------------- end to end


TINY = ["vae.steps=6", "vae.val_every=3", "vae.batch_size=8", "ldm.steps=6", "ldm.val_every=3", "ldm.batch_size=8",
        'vae.extra=["data.source.crops_per_image=30","data.source.val_crops_per_image=6","data.num_workers=1"]',
        'ldm.extra=["model.diffusion.sampler.num_steps=2"]', 'common=["trainer.limit_val_batches=1","trainer.log_every_n_steps=2"]', "latents.num_workers=0",
        "classifier.epochs=2", "classifier.width=4", "classifier.batch_size=32",
        "sample.per_class=3", "sample.grid_columns=5", "sample.steps=3", "sample.guidance=[1.0,3.0]"]


def run_pipeline_cli(pipe_dir: Path, cwd: Path, *extra: str, ok: bool = True, tiny: bool = True) -> str:
    """`python -m ldmlab.pipeline` with the TINY settings (or a preset's own: tiny=False) in a subprocess; its
    output (stdout + stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "ldmlab.pipeline", f"dir={pipe_dir}", f"paths.root_dir={cwd}",
           f"paths.data_dir={shared_data_dir()}", *(TINY if tiny else []), *extra]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert (proc.returncode == 0) == ok, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def run_pipeline_here(pipe_dir: Path, cwd: Path, caplog: pytest.LogCaptureFixture, *extra: str) -> str:
    """The run of run_pipeline_cli (TINY settings) in this process, as `ldmlab.pipeline.__main__` makes it: for the
    re-runs after a command-line run, which test the stage logic, not the entry; its log."""
    from hydra import compose, initialize_config_dir

    caplog.clear()
    with caplog.at_level(logging.INFO), initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run_pipeline(compose("pipeline", overrides=[f"dir={pipe_dir}", f"paths.root_dir={cwd}",
                                                    f"paths.data_dir={shared_data_dir()}", *TINY, *extra]))
    return caplog.text


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("pipeline")
    return cwd / "pipe", run_pipeline_cli(cwd / "pipe", cwd)


@pytest.mark.slow
def test_pipeline_writes_report_with_finite_numbers(pipeline_run: tuple[Path, str]) -> None:
    root, output = pipeline_run
    assert f"report: {root / 'report.md'}" in output
    results = json.loads((root / "results.json").read_text())
    numbers = [results["vae"]["val_psnr"], results["vae"]["val_ssim"], results["ldm"]["train_loss"],
               results["ldm"]["val_loss"], results["classifier"]["val_accuracy"],
               results["classifier"]["recon_accuracy"], *(g["accuracy"] for g in results["samples"]["guidance"]),
               *(m[k] for m in results["samples"]["domain"]["sets"].values() for k in ("fid", "kid", "precision"))]
    assert set(results["samples"]["domain"]["sets"]) == {"reconstructions", "g1", "g3"}
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), numbers
    assert results["vae"]["f"] == 4 and results["latents"]["latent_shape"] == [4, 8, 8]
    assert results["latents"]["train_samples"] == 300 and results["classifier"]["val_samples"] == 60
    report = (root / "report.md").read_text()
    assert f"**{results['vae']['val_psnr']:.2f} dB**" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every image the report shows exists
        assert (root / link).is_file(), link
    assert (root / "vae" / ".hydra" / "config.yaml").is_file() and (root / "ldm" / "export" / "unet.safetensors").is_file()


@pytest.mark.slow
def test_sample_grids_have_one_row_per_class(pipeline_run: tuple[Path, str]) -> None:
    root, _ = pipeline_run
    samples = json.loads((root / "samples" / "result.json").read_text())
    assert [g["scale"] for g in samples["guidance"]] == [1.0, 3.0]
    for g in samples["guidance"]:
        grid = Image.open(root / g["grid"])
        assert grid.height == samples["grid_scale"] * (10 * (32 + 2) + 2)  # 10 photo classes, 32 px samples
        assert g["n"] == 30 and len(g["per_class"]) == 10
    assert samples["grid_columns"] == 3  # sample.grid_columns=5 > sample.per_class=3: all of them


@pytest.mark.slow
def test_restart_skips_finished_stages_and_resumes_the_rest(pipeline_run: tuple[Path, str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    root, _ = pipeline_run
    cwd = root.parent
    stamps = {s: (root / s / "result.json").stat().st_mtime_ns for s in ("vae", "latents", "classifier")}
    output = run_pipeline_here(root, cwd, caplog)
    assert all(f"[{s}] done before" in output for s in ("vae", "latents", "ldm", "classifier", "samples"))
    assert "running into" not in output
    # an interrupted LDM stage (no result yet, a last.ckpt) resumes; samples read it, so they are redone
    ldm_before = json.loads((root / "ldm" / "result.json").read_text())
    (root / "ldm" / "result.json").unlink()
    for p in (root / "samples").iterdir():
        p.unlink()
    output = run_pipeline_here(root, cwd, caplog)
    assert re.search(r"continuing ldm from \S+/ldm/checkpoints/last\.ckpt", output), output[-2000:]
    assert "[samples] running into" in output
    assert all(f"[{s}] done before" in output for s in stamps)
    assert {s: (root / s / "result.json").stat().st_mtime_ns for s in stamps} == stamps
    ldm = json.loads((root / "ldm" / "result.json").read_text())
    assert ldm["steps"] == ldm_before["steps"] and ldm["train_loss"] == pytest.approx(ldm_before["train_loss"])
    # other settings for a finished stage: refused, naming what to delete
    with pytest.raises(StageMismatch) as refused:
        run_pipeline_here(root, cwd, caplog, "ldm.steps=7")
    assert f"rm -r {root / 'ldm'} {root / 'samples'}" in str(refused.value)


@pytest.mark.slow
def test_bucket_demo_trains_mixed_aspect_ratios_and_samples_three(tmp_path: Path) -> None:
    """pipeline=demo_buckets: crops of W/H in [1/2, 2] in three buckets through the VAE, the latent cache (one
    latent shape per bucket) and the LDM; the report shows samples at 32×32, 40×24 and 24×40."""
    root = tmp_path / "pipe"
    run_pipeline_cli(root, tmp_path, "pipeline=demo_buckets")
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["buckets"] == [[4, 6, 10], [4, 8, 8], [4, 10, 6]] and all(manifest["bucket_counts"]["train"])
    samples = json.loads((root / "samples" / "result.json").read_text())
    report = (root / "report.md").read_text()
    assert [(s["width"], s["height"]) for s in samples["sizes"]] == [(32, 32), (40, 24), (24, 40)]
    assert "latents of one shape per bucket ((4, 6, 10), (4, 8, 8), (4, 10, 6))" in report
    for s in samples["sizes"]:
        w, h = s["width"], s["height"]
        assert f"![samples at {w}×{h}](samples/grid_{w}x{h}.png)" in report
        grid = Image.open(root / s["grid"])
        assert grid.height == samples["grid_scale"] * (10 * (h + 2) + 2)  # 10 rows of H-pixel samples
    # the LDM's validation grids at the three bucket shapes (model.sampling.sizes), every guidance scale
    grids = {p.name.split("_step")[0] for p in (root / "ldm" / "images").glob("samples_cfg*.png")}
    assert {f"samples_cfg1_{h}x{w}" for h, w in ((32, 32), (24, 40), (40, 24))} <= grids


def test_repo_root_conf_is_where_the_entry_looks() -> None:
    from ldmlab.pipeline.__main__ import CONF_DIR

    # the package's config tree, which the repo's conf/ links to
    assert CONF_DIR.resolve() == (REPO / "conf").resolve() and (CONF_DIR / "pipeline.yaml").is_file()
