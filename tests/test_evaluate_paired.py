"""`python -m ldmlab.evaluate` on image-conditioned checkpoints (super-resolution, inpainting): a real 4-step
train.py run of each demo experiment (Hydra composition, tiny VAE, demo photos), then the evaluation: sample i
conditioned on held-out image i, PSNR/SSIM recomputed here from the cached samples and the held-out data, the
baselines recomputed from their closed forms (bicubic upsampling, the masked crop with validation's masks, the
VAE reconstruction), the labelled grid, the resume from cached samples, and the one-line refusals."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from test_image_condition_e2e import TINY as E2E_TINY

from ldmlab.configs import CONF_DIR
from ldmlab.data.conditions import masked_image
from ldmlab.evaluate import check_settings, evaluate
from ldmlab.evaluation.paired import quantized, rebatched
from ldmlab.metrics import psnr, ssim
from ldmlab.run import train
from ldmlab.sample import load_ldm

N = 48  # held-out images scored: more than the tiny VAE encoder's 40 features (FD's minimum)
# the image-condition e2e test's tiny run (its override strings stay in one place), 10 photos × 5 = 50 crops held out
HELD_OUT = "data.source.val_crops_per_image="
TINY = [*(o for o in E2E_TINY if not o.startswith(HELD_OUT)), f"{HELD_OUT}5"]


def fake_loader(sizes: list[int]) -> list[dict]:
    """Batches of `sizes` rows whose "image" rows hold their global index, with a list entry beside."""
    start, batches = 0, []
    for size in sizes:
        idx = torch.arange(start, start + size, dtype=torch.float32)
        batches.append({"image": idx[:, None, None, None].expand(size, 3, 2, 2), "key": [f"k{i}" for i in
                                                                                      range(start, start + size)]})
        start += size
    return batches


def test_rebatched_cuts_the_held_out_stream_into_seeded_chunks() -> None:
    got = list(rebatched(fake_loader([3, 3, 3]), n=7, batch_size=4, seed=10))
    assert [(c.index, c.start, c.stop, c.seed) for c, _ in got] == [(0, 0, 4, 10), (1, 4, 7, 11)]
    assert [b["image"][:, 0, 0, 0].tolist() for _, b in got] == [[0, 1, 2, 3], [4, 5, 6]]
    assert got[1][1]["key"] == ["k4", "k5", "k6"]
    with pytest.raises(ValueError, match=r"^n=10: the held-out data hold 9 images .*: set n=9 or fewer"):
        list(rebatched(fake_loader([3, 3, 3]), n=10, batch_size=4))
    padded = fake_loader([4, 4, 4])  # 10 images; a validation stream wraps around to fill its last batch
    padded[2] = {k: v[[0, 1, 0, 1]] if isinstance(v, torch.Tensor) else [*v[:2], "k0", "k1"] for k, v in
                 padded[2].items()}
    with pytest.raises(ValueError, match=r"^n=12: the held-out data hold 10 images"):
        list(rebatched(padded, n=12, batch_size=4))


def fake_module(image_condition: object = None, conditioner: object = None) -> SimpleNamespace:
    return SimpleNamespace(image_condition=image_condition, conditioner=conditioner)


IMAGE_MODEL = fake_module(SimpleNamespace(p_drop=0.0))
REFUSALS = {
    "psnr-without-image-condition": (fake_module(), {"metrics": ["fid", "psnr"]}, (
        "metrics: psnr compare samples with their held-out images, which only an image-conditioned model")),
    "guidance-without-unconditional": (IMAGE_MODEL, {"guidance": [1, 2]}, (
        "guidance=[1, 2]: x.ckpt has no unconditional prediction to guide away from")),
    "reference_n-on-a-paired-model": (IMAGE_MODEL, {"reference_n": 100}, (
        "reference_n=100: an image-conditioned model is scored against the n=48 held-out images")),
}


@pytest.mark.parametrize(("module", "extra", "line"), list(REFUSALS.values()), ids=list(REFUSALS))
def test_settings_refused_in_one_line(module: SimpleNamespace, extra: dict, line: str) -> None:
    cfg = OmegaConf.create({"ckpt": "x.ckpt", "n": N, "reference_n": None, "metrics": None, "guidance": [1.0],
                            **extra})
    with pytest.raises(ValueError, match="^" + line.replace("[", r"\[").replace("]", r"\]")):
        check_settings(cfg, module, SimpleNamespace(has_logits=False, num_features=40))


def test_image_models_score_psnr_and_ssim_by_default() -> None:
    cfg = OmegaConf.create({"ckpt": "x.ckpt", "n": N, "reference_n": None, "metrics": None, "guidance": [1.0]})
    metrics = check_settings(cfg, IMAGE_MODEL, SimpleNamespace(has_logits=False, num_features=40))
    assert metrics == ("fid", "kid", "precision", "recall", "psnr", "ssim")


@pytest.fixture(scope="module", params=["sr_demo", "inpaint_demo"])
def run(request: pytest.FixtureRequest, tiny_assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, Path]:
    """(experiment, run dir) of 4 training steps through ldmlab.run.train."""
    tmp = tmp_path_factory.mktemp(request.param)
    assert train(compose_train([f"experiment={request.param}", f"model.vae.path={tiny_assets['vae']}", *TINY],
                               tmp)) is not None
    return request.param, tmp / "run"


def evaluate_cfg(ckpt: Path, out: Path, *extra: str) -> DictConfig:
    """`python -m ldmlab.evaluate ckpt=... out=...` with small settings, `extra` overriding them."""
    settings = {"n": N, "batch_size": 20, "steps": 2, "device": "cpu", "compile": "none", "grid": 4}
    settings |= dict(e.split("=", 1) for e in extra)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=[f"ckpt={ckpt}", f"out={out}", *[f"{k}={v}" for k, v in settings.items()]])


def held_out(run_dir: Path) -> list[dict]:
    """The first N held-out batches as the checkpoint's data config makes them (validation's masks)."""
    datamodule = hydra.utils.instantiate(OmegaConf.create(load_ldm(run_dir / "checkpoints" / "last.ckpt")
                                                          .config_yaml).data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("validate")
    return [b for _, b in rebatched(datamodule.val_dataloader(), N, N)]


@pytest.mark.slow  # two trainings and three evaluations
def test_evaluate_scores_samples_and_baselines_against_the_held_out_images(run: tuple[str, Path],
                                                                          tmp_path: Path) -> None:
    name, run_dir = run
    ckpt, out = run_dir / "checkpoints" / "last.ckpt", tmp_path / "eval"
    [rows] = evaluate(evaluate_cfg(ckpt, out))
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == [rows] and rows["guidance"] == 1.0
    [batch] = held_out(run_dir)
    truth = batch["image"]
    samples = torch.cat([torch.load(p) for p in sorted((out / "samples").rglob("chunk*.pt"))]).float() / 127.5 - 1
    assert samples.shape == truth.shape == (N, 3, 64, 64)
    for key, metric in (("psnr", psnr), ("ssim", ssim)):  # per-image means of the cached samples
        assert rows[key] == pytest.approx(metric(samples, truth).mean().item(), rel=1e-9)
    module = load_ldm(ckpt)
    with torch.no_grad():
        reconstruction = module.vae.decode(module.vae.encode(truth).mode()).clamp(-1, 1)
    picture = (F.interpolate(batch["low_res"], size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
               if name == "sr_demo" else masked_image(truth, batch["mask"]))  # validation's seeded masks
    baselines = {b["images"]: b for b in results["baselines"]}
    expected = {"bicubic upsampling" if name == "sr_demo" else "masked crop": picture, "VAE reconstruction":
                reconstruction}
    if name == "inpaint_demo":  # the samples as an inpainting tool shows them: known pixels put back
        mask = batch["mask"]
        expected["samples, guidance 1, known pixels pasted back"] = samples * mask + truth * (1 - mask)
    assert set(baselines) == set(expected)
    for label, images in expected.items():
        # rel 1e-4: the VAE decodes batches of 20 there, 48 here (float sums in another order, rounded to uint8)
        assert baselines[label]["psnr"] == pytest.approx(psnr(quantized(images), truth).mean().item(), rel=1e-4)
        assert baselines[label]["ssim"] == pytest.approx(ssim(quantized(images), truth).mean().item(), rel=1e-4)
        assert baselines[label]["fid"] > 0 and 0 <= baselines[label]["precision"] <= 1
    assert all(rows[k] > 0 for k in ("fid", "kid")) and 0 < rows["ssim"] < 1
    report = (out / "report.md").read_text()
    assert "| images | PSNR (dB) | SSIM | FID | KID | precision | recall |" in report
    assert "| samples, guidance 1 |" in report and "| VAE reconstruction |" in report
    # rows: condition | bicubic (SR only: an inpainting model's input is its masked crop) | VAE | sample | truth
    rows_in_grid = 5 if name == "sr_demo" else 4
    assert Image.open(out / "grid.png").size[1] == rows_in_grid * (64 + 2) + 2
    evaluate(evaluate_cfg(ckpt, out))  # every chunk from the cache: the same numbers
    assert json.loads((out / "results.json").read_text())["rows"] == [rows]


@pytest.mark.slow  # a torch.distributed.run subprocess
def test_ranks_condition_sample_i_on_image_i_and_n_is_capped_by_the_held_out_images(run: tuple[str, Path],
                                                                                    tmp_path: Path) -> None:
    """2 gloo ranks, taking chunks in turn, condition and score sample i as 1 rank does (the same PSNR and SSIM);
    n above the held-out images (50, once the stream's wrap-around padding is dropped) is one line."""
    name, run_dir = run
    if name != "sr_demo":
        pytest.skip("one model is enough for the rank split")
    ckpt, env = run_dir / "checkpoints" / "last.ckpt", {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["n=24", "batch_size=6", "grid=0", "metrics=[psnr,ssim]"]
    [one] = evaluate(evaluate_cfg(ckpt, tmp_path / "one", *common))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29541",
                           "-m", "ldmlab.evaluate", f"ckpt={ckpt}", "steps=2", "compile=none", "device=cpu", *common,
                           f"out={tmp_path / 'two'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [two] = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    assert two == pytest.approx(one, rel=1e-5)  # 1 thread per rank there: float sums in another order
    assert len(list((tmp_path / "two" / "samples").rglob("chunk*.pt"))) == 4
    with pytest.raises(ValueError, match=r"^n=60: the held-out data hold 50 images to condition samples on: set "
                                         r"n=50 or fewer \(an image-conditioned model draws one sample per held-out"):
        evaluate(evaluate_cfg(ckpt, tmp_path / "big", "n=60", "metrics=[psnr]"))
    assert not (tmp_path / "big" / "samples").exists()


REPORT = Path(__file__).resolve().parents[1] / "docs" / "image_condition" / "README.md"


def report_lines(prefix: str) -> list[list[str]]:
    """The arguments of every `<prefix> ...` line in the proof report's bash blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", REPORT.read_text(), flags=re.DOTALL)
    return [shlex.split(line.split(" #")[0])[len(prefix.split()):] for block in blocks
            for line in block.replace("\\\n", " ").splitlines() if line.startswith(prefix + " ")]


def test_the_proof_report_commands_compose_as_written(tmp_path: Path) -> None:
    """docs/image_condition/README.md: its train.py lines compose to the experiment they name and its evaluate
    lines to the checkpoint, count and features they name; the grids it shows exist and stay small."""
    trains, evaluations = report_lines("python train.py"), report_lines("python -m ldmlab.evaluate")
    assert len(trains) >= 2 and len(evaluations) >= 2
    for args in trains:
        cfg = compose_train(args, tmp_path)
        said = dict(a.split("=", 1) for a in args)
        assert cfg.task_name == said["experiment"] and str(cfg.trainer.max_steps) == said.get(
            "trainer.max_steps", str(cfg.trainer.max_steps))
    for args in evaluations:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("evaluate", overrides=args)
        said = dict(a.split("=", 1) for a in args)
        assert (cfg.ckpt, cfg.n, cfg.features.name) == (said["ckpt"], int(said["n"]), said["features.name"])
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", REPORT.read_text())
    assert len(pictures) >= 2
    for picture in pictures:
        assert (REPORT.parent / picture).stat().st_size < 300_000, picture
