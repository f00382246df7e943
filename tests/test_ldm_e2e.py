"""`python train.py model=unet_small` on the demo photos through the trained tiny VAE, then `sample.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_train, series, shared_data_dir
from PIL import Image

from ldmlab.cache_latents import main as cache_latents
from ldmlab.sample import load_ldm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ldm_run(vae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded class-conditional LDM run (10 photo classes, CFG dropout 0.1, EMA) on the VAE's latents; 80 steps
    halve its loss (seed 0: 0.99 -> 0.49)."""
    cwd = tmp_path_factory.mktemp("ldm_e2e")
    run_dir = cwd / "run"
    run_train(["model=unet_small", f"model.vae.path={vae_run}/export/vae.safetensors", "trainer.max_steps=80",
               "trainer.val_check_interval=40", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=5",
               "model.diffusion.sampler.num_steps=10", f"hydra.run.dir={run_dir}", "seed=0"], cwd=cwd)
    return run_dir


def test_loss_drops(ldm_run: Path) -> None:
    loss = series(read_metrics(ldm_run), "train/loss")
    first, last = sum(loss[:3]) / 3, sum(loss[-5:]) / 5
    assert last < 0.7 * first, f"LDM loss {first:.3f} -> {last:.3f}: less than a 30% drop"
    assert len(series(read_metrics(ldm_run), "val/loss")) == 2


def test_sample_grids_at_each_guidance_scale(ldm_run: Path) -> None:
    names = sorted(p.name for p in (ldm_run / "images").glob("*.png"))
    assert names == ["samples_cfg1_step0000040.png", "samples_cfg1_step0000080.png",
                     "samples_cfg3_step0000040.png", "samples_cfg3_step0000080.png"]


def test_checkpoint_holds_ema_scale_and_config(ldm_run: Path) -> None:
    ckpt = torch.load(ldm_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "EMA" in ckpt["callbacks"] and ckpt["callbacks"]["EMA"]["num_updates"] == 80
    scale = float(ckpt["state_dict"]["latent_scale"])
    assert 0.05 < scale < 50  # estimated 1/std of the first batch, stored with the weights
    assert "ldmlab.nn.unet.UNetModel" in ckpt["ldmlab_config"]
    assert ckpt["latent_shape"] == [4, 8, 8] and "vae_config" in ckpt


def test_guidance_changes_samples(ldm_run: Path) -> None:
    module = load_ldm(ldm_run / "checkpoints" / "last.ckpt")
    labels = [0, 3, 7, 9]
    cond = module.sample(labels, 4, guidance_scale=1.0, seed=5)
    again = module.sample(labels, 4, guidance_scale=1.0, seed=5)
    guided = module.sample(labels, 4, guidance_scale=3.0, seed=5)
    assert cond.shape == (4, 3, 32, 32)
    torch.testing.assert_close(cond, again)  # fixed seed: reproducible
    assert (guided - cond).abs().mean() > 1e-3


def test_sample_py_writes_requested_images(ldm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), f"ckpt={ldm_run}/checkpoints/last.ckpt",
                           "sampler=dpmpp_2m", "steps=8", "guidance=2", "n=5", "label=3", "individual=true",
                           "batch_size=3", f"out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    singles = sorted(tmp_path.glob("grid_*.png"))
    assert out.exists() and len(singles) == 5
    assert Image.open(singles[0]).size == (32, 32)


def test_exports(ldm_run: Path) -> None:
    assert sorted(p.name for p in (ldm_run / "export").iterdir()) == ["unet.safetensors", "vae.safetensors"]


def test_ldm_trains_under_two_rank_ddp_with_ema(vae_run: Path, tmp_path: Path) -> None:
    """CPU DDP (gloo, 2 real processes): both ranks step together; EMA and the estimated scale are saved once."""
    run_dir = tmp_path / "run"
    proc = run_train(["model=unet_small", f"model.vae.path={vae_run}/export/vae.safetensors", "trainer=ddp",
                      "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                      "trainer.strategy=ddp", "trainer.max_steps=8", "trainer.val_check_interval=4",
                      "trainer.limit_val_batches=2", "model.diffusion.sampler.num_steps=4", "data.batch_size=8",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8 and ckpt["callbacks"]["EMA"]["num_updates"] == 8
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    trained = {k[len("unet."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}
    assert shadow.keys() == trained.keys()
    assert any(not torch.equal(shadow[k], trained[k]) for k in shadow)  # an average, not a copy
    assert float(ckpt["state_dict"]["latent_scale"]) > 0


def test_cached_latents_train_the_ldm_without_the_encoder(vae_run: Path, tmp_path: Path) -> None:
    """cache_latents (demo photos → latent shards) → data=wds_latents → train.py model=unet_small.

    cache_latents runs in-process (test_data_ddp runs its command line, under DDP) on a smaller demo set: 400 train
    crops in two shards of 200, more than the 6 steps read."""
    vae = f"{vae_run}/export/vae.safetensors"
    cache = tmp_path / "latents"
    cache_latents([f"vae={vae}", f"out={cache}", f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}",
                   "batch_size=64", "data.source.crops_per_image=40", "data.source.val_crops_per_image=8",
                   "data.source.shard_size=200"])
    assert sorted(p.name for p in cache.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    run_dir = tmp_path / "run"
    run_train(["model=unet_small", f"model.vae.path={vae}", "data=wds_latents", f"data.root={cache}",
               "data.batch_size=16", "data.num_workers=1", "trainer.max_steps=6", "trainer.val_check_interval=6",
               "trainer.limit_val_batches=1", "model.diffusion.sampler.num_steps=4", "model.sampling.sizes=[[32,32],[32,64]]",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["latent_shape"] == [4, 8, 8]
    # decoded by the VAE loaded for sampling, at each model.sampling.sizes entry (H × W) and guidance scale
    grids = {p.name: Image.open(p).size for p in (run_dir / "images").glob("samples_cfg*.png")}
    assert sorted(grids) == [f"samples_cfg{s}_{hw}_step0000006.png" for s in (1, 3) for hw in ("32x32", "32x64")]
    (w_square, h_square), (w_wide, h_wide) = grids["samples_cfg1_32x32_step0000006.png"], \
        grids["samples_cfg1_32x64_step0000006.png"]
    assert h_wide == h_square and w_wide > w_square  # the 32×64 samples are twice as wide
