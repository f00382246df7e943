"""experiment=sr_demo and experiment=inpaint_demo: a few real Trainer steps through ldmlab.run.train (Hydra
composition, tiny VAE, demo photos), val/psnr and condition | sample | truth grids, then sample.py on the saved
checkpoint with image= (and mask=), and its one-line refusals of inputs the model cannot take."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_train, read_metrics, series
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from ldmlab.configs import CONF_DIR
from ldmlab.lit.image_condition import Inpainting, SuperResolution
from ldmlab.run import train
from ldmlab.sample import load_ldm, sample
from ldmlab.validate.sample import sample_problems

EXPERIMENTS = {"sr_demo": SuperResolution, "inpaint_demo": Inpainting}
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "data.batch_size=4",
        "data.num_workers=0", "model.diffusion.sampler.num_steps=3", "trainer.num_sanity_val_steps=0",
        "callbacks.image_grids.num_images=4", "callbacks.condition_psnr.batches=1", "data.source.crops_per_image=20",
        "data.source.val_crops_per_image=4", "trainer.log_every_n_steps=1", "seed=0"]


@pytest.fixture(scope="module", params=list(EXPERIMENTS))
def run(request: pytest.FixtureRequest, tiny_assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, Path]:
    """(experiment, run dir) of 4 training steps and one validation (val/psnr, grids, checkpoint, export)."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = compose_train([f"experiment={request.param}", f"model.vae.path={tiny_assets['vae']}", *TINY], tmp)
    assert train(cfg) is not None  # optimized_metric val/loss
    return request.param, tmp / "run"


def test_training_logs_psnr_and_triptych_grids(run: tuple[str, Path]) -> None:
    name, run_dir = run
    rows = read_metrics(run_dir)
    assert len(series(rows, "train/loss")) >= 1 and np.isfinite(series(rows, "val/loss")).all()
    psnr, baseline, ceiling = (series(rows, f"val/psnr{s}") for s in ("", "_condition", "_autoencoder"))
    assert len(psnr) == len(baseline) == len(ceiling) == 1 and 0 < psnr[0] < 60 and 5 < baseline[0] < 60
    assert 0 < ceiling[0] < 60  # a random tiny VAE: low, but a number
    grid = Image.open(run_dir / "images" / "samples_cfg1_step0000004.png")
    assert grid.size == (4 * (3 * 64 + 2) + 2, 64 + 4)  # 4 × (condition | sample | truth) of 64 px, one row
    module = load_ldm(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(module.image_condition, EXPERIMENTS[name])
    assert module.unet.config["in_channels"] == {"sr_demo": 7, "inpaint_demo": 9}[name]
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["unet.safetensors", "vae.safetensors"]


def write_inputs(tmp_path: Path, name: str, side: int = 16, mask_side: int | None = None) -> dict[str, Path]:
    """A random low-res PNG (super-resolution) or a PNG and a mask of `mask_side` (inpainting)."""
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(image)
    if name == "sr_demo":
        return {"image": image}
    m = mask_side or side
    mask = np.zeros((m, m), np.uint8)
    mask[m // 4: m // 2, :] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return {"image": image, "mask": tmp_path / "mask.png"}


def sample_cfg(ckpt: Path, out: Path, **extra: object) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=[f"ckpt={ckpt}", f"out={out}", "n=2", "steps=2", "device=cpu",
                                            *[f"{k}={v}" for k, v in extra.items() if v is not None]])


@pytest.mark.slow  # a subprocess
def test_sample_py_takes_the_condition_images(run: tuple[str, Path], tmp_path: Path) -> None:
    """`python sample.py ckpt=... image=low.png [noise_level=]` (16 px → 64 px) / `image=x.png mask=m.png`."""
    name, run_dir = run
    inputs = write_inputs(tmp_path, name, side=16 if name == "sr_demo" else 64)
    extra = ["noise_level=50"] if name == "sr_demo" else []
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), f"ckpt={run_dir}/checkpoints/last.ckpt",
                           *[f"{k}={v}" for k, v in inputs.items()], *extra, "n=2", "steps=2", "individual=true",
                           f"out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    singles = sorted(tmp_path.glob("grid_*.png"))
    assert len(singles) == 2 and Image.open(singles[0]).size == (64, 64)
    level = sample(sample_cfg(run_dir / "checkpoints/last.ckpt", tmp_path / "g2.png", **inputs,
                              noise_level=300 if name == "sr_demo" else None))
    if name == "sr_demo":  # the augmentation level reaches the model
        assert not np.array_equal(np.asarray(Image.open(level)), np.asarray(Image.open(out)))


@pytest.mark.parametrize("case", ["missing_file", "bad_size", "mask_size", "no_mask", "no_image", "stray"])
def test_sample_py_refuses_bad_inputs_in_one_line(run: tuple[str, Path], tmp_path: Path, case: str) -> None:
    name, run_dir = run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    side = 16 if name == "sr_demo" else 64
    expected = {  # built lazily: each case writes its own files
        "missing_file": lambda: ({**write_inputs(tmp_path, name, side), "image": tmp_path / "nope.png"},
                                 "nope.png not found: give a PNG or JPEG file"),
        # VAE f4 × U-Net 2 = 8: a 15 px low-res image is 60 px at ×4; a 60 px image to inpaint is no multiple of 8
        "bad_size": lambda: (write_inputs(tmp_path, name, side - 1 if name == "sr_demo" else 60),
                             "not a multiple of 8 (VAE factor 4 × U-Net factor 2"),
        "mask_size": lambda: (write_inputs(tmp_path, name, 64, mask_side=32), "mask=") if name == "inpaint_demo"
        else ({**write_inputs(tmp_path, name, side), "mask": tmp_path / "in.png"},
              "is not used by a super-resolution model: drop it"),
        "no_mask": lambda: ({"image": write_inputs(tmp_path, name, side)["image"]},
                            "mask is null but" if name == "inpaint_demo" else None),
        "no_image": lambda: ({}, "image is null but"),
        "stray": lambda: ({**write_inputs(tmp_path, name, side), "height": 64},
                          "an image-conditioned model's size follows image=; drop height="),
    }
    inputs, line = expected[case]()
    problems = sample_problems(sample_cfg(ckpt, tmp_path / "x.png", **inputs))
    if line is None:  # a super-resolution model needs no mask
        assert problems == []
        return
    assert len(problems) == 1 and line in problems[0] and "\n" not in problems[0], problems
    if case == "mask_size" and name == "inpaint_demo":
        assert "is 32×32 px but image=" in problems[0] and "give a mask of the image's size" in problems[0]
    if case == "bad_size":
        assert problems[0].endswith("sides are multiples of 2" if name == "sr_demo" else "sides are multiples of 8")


def test_sample_needs_its_condition(run: tuple[str, Path]) -> None:
    name, run_dir = run
    module = load_ldm(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="needs batch entries"):
        module.sample(None, 1, latent_shape=(4, 16, 16))
    images = ({"low_res": torch.zeros(1, 3, 16, 16)} if name == "sr_demo" else
              {"image": torch.zeros(1, 3, 64, 64), "mask": torch.ones(1, 1, 64, 64)})
    assert module.sample(None, 1, images=images, sampler=lambda d, x, *a, **k: x).shape == (1, 3, 64, 64)
