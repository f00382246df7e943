"""Any image size (issue 21): our U-Net and VAE at non-square sizes give diffusers' shapes and values under the
same weights; the total downsampling is VAE factor × 2^(levels−1) of our U-Net; train.py and sample.py refuse a
size or bucket off that multiple in one line naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train
from omegaconf import DictConfig, OmegaConf
from test_autoencoder import assert_matches_diffusers, diffusers_vae, paired
from test_unet import assert_close_rel, conditioning, diffusers_out, diffusers_twin, randomized, small

from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.validate import check_config
from ldmlab.validate.sample import sample_problems

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("hw", [(8, 20), (20, 8), (12, 16)])
def test_unet_at_non_square_latents_equals_diffusers(hw: tuple[int, int], one_thread) -> None:
    torch.manual_seed(0)
    ours = randomized(small(context_dim=24))  # channel_mult (1, 2, 2): latents divide by 4
    theirs = diffusers_twin(ours)
    x, t = torch.randn(2, 4, *hw), torch.tensor([3, 999])
    cond = conditioning(ours, 2)
    with torch.no_grad():
        mine, ref = ours(x, t, **cond), diffusers_out(theirs, x, t, cond)
    assert mine.shape == ref.shape == x.shape
    assert_close_rel(mine, ref)


def test_unet_factor_is_two_to_the_levels_minus_one() -> None:
    """Which multiple our U-Net needs, by building it: 2^(len(channel_mult) − 1), not 2^len."""
    for mult in [(1, 2), (1, 2, 2), (1, 2, 4, 4)]:
        net = small(channel_mult=mult, attention_levels=(1,), context_dim=32).eval()
        f = 2 ** (len(mult) - 1)
        assert net.downsample_factor == f
        with torch.no_grad():
            assert net(torch.randn(1, 4, f, 3 * f), torch.tensor([1]), context=torch.randn(1, 3, 32)).shape == \
                (1, 4, f, 3 * f)
            with pytest.raises(ValueError, match=f"not divisible by 2\\^\\(levels-1\\) = {f}"):
                net(torch.randn(1, 4, f, f + f // 2), torch.tensor([1]), context=torch.randn(1, 3, 32))


@pytest.mark.parametrize("hw", [(16, 40), (40, 16)])
def test_vae_at_non_square_images_equals_diffusers(hw: tuple[int, int], one_thread) -> None:
    torch.manual_seed(0)
    ours, theirs = paired(AutoencoderKL(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
                          diffusers_vae((32, 64), layers=1, groups=8))
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        assert ours.encode(x).mean.shape == theirs.encode(x).latent_dist.mean.shape == (1, 4, hw[0] // 2, hw[1] // 2)
    assert_matches_diffusers(ours, theirs, x)


def test_train_config_refuses_buckets_off_the_total_downsampling(tmp_path: Path,
                                                                 tiny_assets: dict[str, Path]) -> None:
    base = ["model=unet_small", f"model.vae.path={tiny_assets['vae']}", "data=wds", f"data.root={tmp_path}"]

    def lines(extra: list[str]) -> list[str]:
        return [p for p in check_config(compose_train(base + extra, tmp_path)) if p.startswith("data.decoder.buckets")]

    assert lines(["data.decoder.buckets=[[32,32],[24,40]]"]) == []  # VAE f4 × U-Net 2: multiples of 8
    why = "VAE factor 4 × U-Net factor 2 of model.unet.channel_mult=[1, 2]"
    assert lines(["data.decoder.buckets=[[32,32],[20,40]]"]) == [
        f"data.decoder.buckets has [20, 40]: not a multiple of 8 ({why}): use sizes that are, e.g. [24, 40]"]
    assert lines(["data.decoder.buckets={area:4096,step:12}"]) == [
        f"data.decoder.buckets.step=12 is not a multiple of 8 ({why}): set data.decoder.buckets.step=16"]


def test_train_config_refuses_grid_sizes_off_the_total_downsampling(tmp_path: Path,
                                                                    tiny_assets: dict[str, Path]) -> None:
    base = ["model=unet_small", f"model.vae.path={tiny_assets['vae']}"]

    def lines(extra: list[str]) -> list[str]:
        return [p for p in check_config(compose_train(base + extra, tmp_path)) if p.startswith("model.sampling")]

    assert lines(["model.sampling.sizes=[[32,32],[24,40]]"]) == []
    why = "VAE factor 4 × U-Net factor 2 of model.unet.channel_mult=[1, 2]"
    assert lines(["model.sampling.sizes=[[32,32],[20,40]]"]) == [
        f"model.sampling.sizes has [20, 40]: not a multiple of 8 ({why}): use [24, 40]"]
    assert lines(["model.sampling.sizes=[[32,32,3]]"]) == [
        "model.sampling.sizes has [32, 32, 3]: give [height, width] pairs, e.g. [[512, 768], [768, 512]]"]


def test_sample_config_refuses_a_size_off_the_total_downsampling(tmp_path: Path,
                                                                 tiny_assets: dict[str, Path]) -> None:
    """sample.py height= width= against the checkpoint's stored config (networks built on the meta device)."""
    stored = compose_train(["model=unet_small", f"model.vae.path={tiny_assets['vae']}"], tmp_path)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"ldmlab_config": OmegaConf.to_yaml(stored, resolve=True)}, ckpt)

    def cfg(**kw: object) -> DictConfig:
        return OmegaConf.merge(OmegaConf.load(Path(__file__).parents[1] / "conf" / "sample.yaml"),
                               {"ckpt": str(ckpt), **kw})

    assert sample_problems(cfg(height=48, width=80)) == []
    why = "VAE factor 4 × U-Net factor 2 of model.unet.channel_mult=[1, 2]"
    assert sample_problems(cfg(height=50, width=80)) == [f"height=50 is not a multiple of 8 ({why}): set height=48"]
    assert sample_problems(cfg(width=0)) == ["width=0 must be a positive integer, e.g. width=512"]


@pytest.mark.slow
def test_train_with_buckets_then_sample_at_any_size(tmp_path: Path, tiny_assets: dict[str, Path]) -> None:
    """train.py on mixed aspect ratios with buckets (validation and checkpoint included), then sample.py at a
    size it never trained at, and refusing one off the multiple in one line."""
    import subprocess
    import sys

    import numpy as np
    from conftest import REPO, run_train
    from PIL import Image

    from ldmlab.data.make_shards import main as make_shards_main

    rng = np.random.default_rng(0)
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "b").mkdir()
    for i, (h, w) in enumerate([(40, 40), (30, 50), (50, 30), (36, 60), (60, 36)] * 6):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(tmp_path / "src" / "ab"[i % 2] / f"{i}.png")
    make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "max_count=8", "val_fraction=0.2"])
    run_dir = tmp_path / "run"
    run_train(["model=unet_small", f"model.vae.path={tiny_assets['vae']}", "model.conditioner.num_classes=2",
               "data=wds", f"data.root={tmp_path / 'shards'}", "data.decoder.buckets=[[32,32],[24,40],[40,24]]",
               "data.batch_size=4", "data.num_workers=1", "debug=limit", "model.diffusion.sampler.num_steps=2",
               f"hydra.run.dir={run_dir}"], cwd=tmp_path)

    def sample(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "sample.py"), f"ckpt={run_dir}/checkpoints/last.ckpt",
                               "steps=2", "n=2", "individual=true", f"out={tmp_path / 'grid.png'}", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)

    proc = sample("height=48", "width=80")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "grid_0000.png").size == (80, 48)  # PIL: (W, H)
    proc = sample("height=50")
    assert proc.returncode != 0
    assert "height=50 is not a multiple of 8 (VAE factor 4 × U-Net factor 2" in proc.stderr + proc.stdout
