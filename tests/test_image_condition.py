"""Image conditions (ldmlab.lit.image_condition): the U-Net's concat and noise-level inputs against diffusers, the
converter for SD-inpainting's 9-channel and a super-resolution U-Net, the conditions' inputs in closed form,
SD-inpainting's channel order against diffusers' StableDiffusionInpaintPipeline, config checks and PSNR."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from safetensors.torch import save_file
from test_convert_pipeline import save_checkpoint, text_overrides
from test_unet import SMALL, diffusers_twin, randomized

from ldmlab.convert.__main__ import main
from ldmlab.convert.checkpoint import load_ldmlab
from ldmlab.convert.unet import diffusers_unet_config, infer_unet_config, ldmlab_unet_config
from ldmlab.diffusion import Diffusion, EpsPrediction, ddim_sample, scaled_linear
from ldmlab.lit.image_condition import Inpainting, SuperResolution
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.metrics import PixelFidelity, psnr, ssim
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.unet import UNetModel
from ldmlab.sample import load_ldm
from ldmlab.validate import check_config

diffusers = pytest.importorskip("diffusers")

EXACT = 1e-5  # max |Δ| of converted U-Nets' outputs (O(1) values, fp32)
INPAINT: dict[str, Any] = {**SMALL, "in_channels": 9, "context_dim": 24}
SR: dict[str, Any] = {**SMALL, "in_channels": 7, "context_dim": None, "noise_level_embed": True}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- the U-Net's inputs and the converter


def test_concat_channels_follow_x() -> None:
    unet, g = randomized(UNetModel(**INPAINT)), torch.Generator().manual_seed(0)
    x, extra, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g), torch.randn(2, 3, 24)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, concat=extra), unet(torch.cat([x, extra], 1), t, ctx))
    with pytest.raises(ValueError, match=r"expects \(B, 9, H, W\)"):
        unet(x, t, ctx, concat=extra[:, :4])


def test_sd_inpainting_unet_converts_with_equal_outputs(tmp_path: Path) -> None:
    """A 9-input-channel diffusers UNet2DConditionModel (SD-inpainting's layout, random weights, a plain diffusers
    config) → ldmlab, in memory and by the CLI from a saved directory, gives diffusers' outputs."""
    twin = diffusers_twin(randomized(UNetModel(**INPAINT), seed=3))
    foreign = {k: v for k, v in diffusers_unet_config(UNetModel(**INPAINT).config).items() if k != "_ldmlab_config"}
    theirs = diffusers.UNet2DConditionModel.from_config(foreign).eval()
    theirs.load_state_dict(twin.state_dict(), strict=True)
    theirs.save_pretrained(tmp_path / "unet")
    main(["--from", "diffusers", "--to", "ldmlab", "--unet", str(tmp_path / "unet"), "--out", str(tmp_path / "o")])
    sd, config = load_ldmlab(tmp_path / "o/unet.safetensors", "unet")
    assert config == ldmlab_unet_config(foreign) and config["in_channels"] == 9 and not config["noise_level_embed"]
    ours = UNetModel(**config).eval()
    ours.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(1)
    x, mask, masked = (torch.randn(2, c, 16, 16, generator=g) for c in (4, 1, 4))
    t, ctx = torch.tensor([10, 900]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        expected = theirs(torch.cat([x, mask, masked], 1), t, ctx).sample  # StableDiffusionInpaintPipeline's order
        assert max_diff(ours(x, t, ctx, concat=torch.cat([mask, masked], 1)), expected) < EXACT
    assert infer_unet_config(ours.state_dict(), num_heads=4)["in_channels"] == 9  # SD-original files too


def test_noise_level_embedding_is_diffusers_timestep_class_embedding() -> None:
    """ldmlab's noise_level_embed = diffusers' class_embed_type="timestep" fed class_labels=noise_level; both ways."""
    ours = randomized(UNetModel(**SR), seed=5)
    config = diffusers_unet_config(ours.config)
    assert config["class_embed_type"] == "timestep" and config["num_class_embeds"] is None
    theirs = diffusers_twin(ours)
    g = torch.Generator().manual_seed(2)
    x, low, level = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0, 350])
    t = torch.tensor([5, 500])
    with torch.no_grad():
        out = ours(x, t, concat=low, noise_level=level)
        assert max_diff(out, theirs(torch.cat([x, low], 1), t, None, class_labels=level).sample) < EXACT
        assert max_diff(out, ours(x, t, concat=low, noise_level=level + 100)) > 1e-3  # the level matters
    foreign = {k: v for k, v in config.items() if k != "_ldmlab_config"}
    assert ldmlab_unet_config(foreign) == ours.config
    with pytest.raises(ValueError, match="noise_level is None but noise_level_embed=True"):
        ours(x, t, concat=low)
    with pytest.raises(ValueError, match="two class embeddings"):
        diffusers_unet_config({**ours.config, "num_classes": 3})


# ---------------------------------------------------------------- the conditions' inputs


def ddpm_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """ᾱ_s of DDPM's linear schedule in closed form: Π_{i<=s} (1 − β_i), β linear in [1e-4, 0.02] over 1000 steps."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)[s]


def test_super_resolution_noise_augmentation_is_q_sample() -> None:
    """Training: s ~ U{0..max}, concat = √ᾱ_s·low + √(1−ᾱ_s)·ε (the same draws); eval: the fixed level."""
    cond, g = SuperResolution(max_noise_level=350, noise_level=20), torch.Generator().manual_seed(0)
    low = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1
    out = cond.inputs({"low_res": low}, (4, 4), encode=None, generator=torch.Generator().manual_seed(7), train=True)
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 351, (64,), generator=g)
    eps = torch.randn(low.shape, generator=g)
    ab = ddpm_alpha_bar(s).float()[:, None, None, None]
    assert torch.equal(out["noise_level"], s) and s.max() > 200 and s.min() < 150
    torch.testing.assert_close(out["concat"], ab.sqrt() * low + (1 - ab).sqrt() * eps, rtol=1e-5, atol=1e-6)
    fixed = cond.inputs({"low_res": low}, (4, 4), None, torch.Generator().manual_seed(7), train=False)
    assert (fixed["noise_level"] == 20).all()
    plain = SuperResolution(max_noise_level=0, noise_level=0).inputs({"low_res": low}, (8, 8), None)
    assert set(plain) == {"concat"} and plain["concat"].shape == (64, 3, 8, 8)  # resized to the latent size
    assert cond.channels(4) == 3 and Inpainting().channels(4) == 5


def test_inpainting_inputs_are_the_mask_then_the_masked_latent() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 4:12, 0:8], mask[1] = 1, 1
    encode = lambda px: F.avg_pool2d(px, 4)[:, :1].repeat(1, 4, 1, 1) * 0.5  # a stand-in f4 encoder, 4 channels
    out = Inpainting().inputs({"image": image, "mask": mask}, (4, 4), encode)["concat"]
    assert out.shape == (2, 5, 4, 4)
    assert torch.equal(out[:, :1], mask[:, :, ::4, ::4])  # nearest: diffusers' F.interpolate(mask, size)
    assert torch.equal(out[:, 1:], encode(image * (1 - mask)))
    with pytest.raises(ValueError, match=r"needs batch entries \['image', 'mask'\], missing \['mask'\]"):
        Inpainting().inputs({"image": image}, (4, 4), encode)


def test_condition_dropout_and_guidance_halves() -> None:
    """p_drop zeroes whole training rows (seeded); sampling then guides with zeros, else with the same image."""
    cond, low = SuperResolution(max_noise_level=0, noise_level=0, p_drop=0.5), torch.rand(200, 3, 2, 2) + 0.5
    out = cond.inputs({"low_res": low}, (2, 2), None, torch.Generator().manual_seed(0), train=True)["concat"]
    zero = (out == 0).flatten(1).all(1)
    assert 60 < zero.sum() < 140 and torch.equal(out[~zero], low[~zero])
    extra = {"concat": low[:2]}
    c, u = cond.guided({}, None, extra)
    assert torch.equal(c["concat"], low[:2]) and u is not None and (u["concat"] == 0).all()
    c, u = Inpainting().guided({"context": torch.ones(2)}, {"context": torch.zeros(2)}, extra)
    assert u is not None and torch.equal(u["concat"], extra["concat"]) and (u["context"] == 0).all()


def test_module_needs_latent_plus_condition_channels(tiny_assets: dict[str, Path]) -> None:
    from ldmlab.convert.load import load_vae

    diffusion = Diffusion(EpsPrediction(), scaled_linear(), sampler=partial(ddim_sample, num_steps=2))
    make = partial(LatentDiffusionModule, diffusion=diffusion, vae=load_vae(tiny_assets["vae"]))
    make(unet=UNetModel(**{**INPAINT, "context_dim": None}), image_condition=Inpainting())
    with pytest.raises(ValueError, match=r"\(\+ 5 of model.image_condition\): set model.unet.in_channels=9"):
        make(unet=UNetModel(**{**SR, "noise_level_embed": False}), image_condition=Inpainting())


# ---------------------------------------------------------------- SD-inpainting's layout = diffusers' pipeline


class LatentFirst(torch.nn.Module):
    """A U-Net fed cat([x_t, masked latent, mask]): the order diffusers does not use."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.inner = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, concat: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.inner(x, t, concat=concat.roll(-1, dims=1), **kw)


def deterministic_vae(path: Path) -> Path:
    """A random f4 VAE export whose posterior std is e^-15 (logvar at its −30 clamp): its samples are its means,
    so diffusers' sampled masked-image latent equals ldmlab's posterior mean."""
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -100.0
    save_file(vae.state_dict(), str(path), metadata={"format": "ldmlab.vae", "config": json.dumps(vae.config)})
    return path


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inpainting_model_runs_in_diffusers_inpaint_pipeline(tiny_assets: dict[str, Path], tmp_path: Path,
                                                             guidance: float) -> None:
    """An ldmlab inpainting checkpoint exported by the CLI loads as StableDiffusionInpaintPipeline and draws
    ldmlab's images from the same x_T, image and mask: cat([x_t, mask, masked latent]) is diffusers' order."""
    vae = deterministic_vae(tmp_path / "vae.safetensors")
    ckpt = save_checkpoint([*text_overrides(tiny_assets["clip32"], vae), "model/image_condition=inpainting"], tmp_path)
    main(["--from", "ldmlab", "--to", "diffusers", "--ckpt", str(ckpt), "--ema", "--out", str(tmp_path / "pipe")])
    assert json.loads((tmp_path / "pipe/model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:24, 4:20], mask[1, :, :, 16:] = 1, 1
    prompts = ["lower newer", "wider lowest"]
    ours = load_ldm(ckpt).sample(prompts, 2, guidance, seed=3, images={"image": image, "mask": mask})
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))  # as sample() draws it
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, image=(image + 1) / 2, mask_image=mask, height=32, width=32, num_inference_steps=5,
                  guidance_scale=guidance, eta=0.0, latents=x_T, output_type="pt").images * 2 - 1
    assert ours.std() > 0.01
    print(f"guidance {guidance}: max |ldmlab - diffusers inpaint pipeline| = {max_diff(ours, theirs):.2e}")
    assert max_diff(ours, theirs) < 1e-4  # measured ~1e-6, as the text pipeline's test
    swapped = load_ldm(ckpt)  # the masked latent before the mask: no longer diffusers' pipeline
    swapped.unet = LatentFirst(swapped.unet)
    assert max_diff(swapped.sample(prompts, 2, guidance, seed=3, images={"image": image, "mask": mask}), theirs) > 1e-3


# ---------------------------------------------------------------- config checks, PSNR


@pytest.mark.parametrize(("overrides", "line"), [
    (["experiment=inpaint_demo", "model.unet.in_channels=4"],
     "model.unet.in_channels=4 but the VAE at model.vae.path="),
    (["experiment=sr_demo", "data=demo"], "model.image_condition is SuperResolution but data.decoder is"),
    (["experiment=sr_demo", "data.decoder.factor=2"], "data.decoder.factor=2 (the low-res crops) differs"),
    (["experiment=sr_demo", "model.unet.noise_level_embed=false"], "set model.unet.noise_level_embed=true"),
    (["experiment=sr_demo", "model.image_condition.noise_level=400"], "noise_level=400 <= max_noise_level=350"),
    (["model=unet_small", "eval=psnr"], "eval=psnr scores an image-conditioned model, but model.image_condition"),
])
def test_config_mismatches_are_one_line(overrides: list[str], line: str, tiny_assets: dict[str, Path],
                                        tmp_path: Path) -> None:
    cfg = compose_train([*overrides, f"model.vae.path={tiny_assets['vae']}"], tmp_path)
    problems = check_config(cfg)
    assert len(problems) == 1 and line in problems[0] and "\n" not in problems[0], problems
    if "in_channels" in line:
        assert "4-channel latents + 5 of model.image_condition: set model.unet.in_channels=9" in problems[0]


def test_experiments_pass_the_config_checks(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    for name in ("sr_demo", "inpaint_demo"):
        assert check_config(compose_train([f"experiment={name}", f"model.vae.path={tiny_assets['vae']}"],
                                          tmp_path)) == []


def test_psnr_closed_form_and_torchmetrics() -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    y = torch.rand(3, 3, 8, 8) * 2 - 1
    x = y + torch.tensor([0.1, 0.2, 0.4])[:, None, None, None]
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(4 / torch.tensor([0.01, 0.04, 0.16], dtype=torch.float64)))
    noisy = (y + 0.3 * torch.randn_like(y)).clamp(-1, 1)
    ref = peak_signal_noise_ratio((noisy + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(noisy, y).float(), ref, rtol=1e-5, atol=1e-4)
    assert torch.isinf(psnr(y, y)).all()


def test_ssim_against_skimage_and_torchmetrics_and_closed_forms() -> None:
    """Wang et al.'s SSIM as skimage computes it (Gaussian window, the border where the window does not fit left
    out); torchmetrics averages the reflect-padded full map, so its map is compared with that border cropped."""
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    y = torch.rand(3, 3, 24, 20, generator=g) * 2 - 1
    x = (y + 0.3 * torch.randn(y.shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y)
    ref = [structural_similarity(((a + 1) / 2).permute(1, 2, 0).double().numpy(),
                                 ((b + 1) / 2).permute(1, 2, 0).double().numpy(), data_range=1.0, channel_axis=2,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False) for a, b in zip(x, y)]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    _, full = structural_similarity_index_measure(((x + 1) / 2).double(), ((y + 1) / 2).double(), data_range=1.0,
                                                  reduction="none", return_full_image=True)
    torch.testing.assert_close(ours, full[..., 5:-5, 5:-5].flatten(1).mean(1), rtol=1e-9, atol=1e-9)
    # 1 for identical images; the same picture in [0, 255] scores the same; lower under more noise
    torch.testing.assert_close(ssim(y, y), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ssim((x + 1) * 127.5, (y + 1) * 127.5, value_range=(0, 255)), ours)
    assert (ssim((y + torch.randn(y.shape, generator=g)).clamp(-1, 1), y) < ours).all()
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(x[..., :10, :10], y[..., :10, :10])


def test_pixel_fidelity_averages_per_image_scores() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    x = (y + 0.2 * torch.randn(y.shape, generator=g)).clamp(-1, 1)
    scores = PixelFidelity()
    scores.update(x[:2], y[:2])
    scores.update(x[2:], y[2:])
    assert scores.compute() == pytest.approx({"psnr": psnr(x, y).mean().item(), "ssim": ssim(x, y).mean().item()})
    with pytest.raises(ValueError, match="no images"):
        PixelFidelity().compute()
