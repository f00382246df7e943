"""A full StableDiffusionPipeline directory from a text LDM checkpoint (ldmlab.convert.pipeline): diffusers loads it
and draws the images ldmlab's sampler draws from the same x_T; scheduler configs match the training schedule."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import hydra
import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf

from ldmlab.convert.__main__ import main
from ldmlab.convert.pipeline import NEEDS_TEXT, TEXT_CONDITIONER, scheduler_config, write_pipeline
from ldmlab.sample import load_ldm

LATENT = (4, 8, 8)  # 32 px images through the f4 tiny VAE
PROMPTS = ["lower newer", "wider lowest"]
TOLERANCE = 1e-4  # max |Δ| of fp32 images in [-1, 1], ldmlab vs diffusers (measured ~1e-6)


def text_overrides(clip: Path, vae: Path) -> list[str]:
    """`model=unet_small` turned into a text model on the tiny CLIP encoder and VAE."""
    return ["model=unet_small", f"model.vae.path={vae}", f"model.conditioner._target_={TEXT_CONDITIONER}",
            "~model.conditioner.num_classes", f"+model.conditioner.path={clip}", "model.unet.context_dim=32",
            "model.unet.num_classes=null", "model.latent_scale=0.8",
            "model.diffusion.sampler.num_steps=5"]


def save_checkpoint(overrides: list[str], tmp_path: Path, ema: bool = True) -> Path:
    """A train.py-style checkpoint of the composed model with random (non-zero) U-Net weights, EMA copy different."""
    cfg = compose_train(overrides, tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    module.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    module._latent_shape = LATENT
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.unet.parameters():  # zero-initialised output layers would make every model alike
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    raw = {"state_dict": module.state_dict(), "ldmlab_config": module.config_yaml}
    module.on_save_checkpoint(raw)
    if ema:
        raw["callbacks"] = {"EMA": {"shadow": {k: v + 0.02 * torch.randn(v.shape, generator=g)
                                               for k, v in module.unet.state_dict().items()}}}
    path = tmp_path / "last.ckpt"
    torch.save(raw, path)
    return path


@pytest.fixture(scope="module")
def text_pipeline(tiny_assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, pipeline directory written by the CLI with EMA weights)."""
    tmp = tmp_path_factory.mktemp("pipe")
    ckpt = save_checkpoint(text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), tmp)
    main(["--from", "ldmlab", "--to", "diffusers", "--ckpt", str(ckpt), "--ema", "--out", str(tmp / "pipe")])
    return ckpt, tmp / "pipe"


def test_pipeline_directory_is_complete(text_pipeline: tuple[Path, Path]) -> None:
    _, out = text_pipeline
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / part).is_dir(), part
    assert json.loads((out / "vae/config.json").read_text())["scaling_factor"] == pytest.approx(0.8)
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    assert (sched["timestep_spacing"], sched["steps_offset"], sched["set_alpha_to_one"], sched["clip_sample"]) == (
        "leading", 1, False, False)
    assert sched["_ldmlab_sampler"] == {"num_steps": 5, "eta": 0.0}


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_diffusers_pipeline_draws_ldmlab_images(text_pipeline: tuple[Path, Path], guidance: float) -> None:
    """Same x_T (ldmlab's seeded CPU draw), 5 DDIM steps, same guidance ('' as the negative prompt on both sides)."""
    ckpt, out = text_pipeline
    module = load_ldm(ckpt, use_ema=True)
    ours = module.sample(PROMPTS, len(PROMPTS), guidance, seed=3)  # (B, 3, 32, 32) in [-1, 1]
    x_T = torch.randn((len(PROMPTS), *LATENT), generator=torch.Generator().manual_seed(3))  # as sample() draws it
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=5, guidance_scale=guidance, eta=0.0,
                  latents=x_T, output_type="pt").images * 2 - 1  # postprocess maps [-1, 1] to [0, 1]
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert ours.std() > 0.01  # a real picture, not a constant
    diff = (ours - theirs).abs().max().item()
    print(f"guidance {guidance}: max |ldmlab - diffusers| = {diff:.2e}")
    assert diff < TOLERANCE
    without_ema = load_ldm(ckpt, use_ema=False).sample(PROMPTS, len(PROMPTS), guidance, seed=3)
    assert (without_ema - theirs).abs().max() > 100 * TOLERANCE  # the pipeline holds the EMA U-Net


def scheduler_of(overrides: list[str], tmp_path: Path) -> dict:
    cfg = compose_train(["model=unet_small", *overrides], tmp_path)
    return scheduler_config(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.mark.parametrize(("overrides", "expected", "cls"), [
    ([], {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "beta_end": 0.012, "num_train_timesteps": 1000}, diffusers.DDIMScheduler),
    (["model/diffusion/prediction=v", "model/diffusion/noise_schedule=cosine"],
     {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}, diffusers.DDIMScheduler),
    (["model/diffusion/noise_schedule=ddpm_linear", "model.diffusion.noise_schedule.zero_terminal_snr=true",
      "model/diffusion/sampler=euler"],
     {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "rescale_betas_zero_snr": True,
      "timestep_spacing": "linspace", "use_karras_sigmas": False}, diffusers.EulerDiscreteScheduler),
    (["model/diffusion/sampler=dpmpp_2m"], {"algorithm_type": "dpmsolver++", "solver_order": 2},
     diffusers.DPMSolverMultistepScheduler),
    (["model/diffusion/sampler=ddpm", "model.diffusion.noise_schedule.num_timesteps=500"],
     {"variance_type": "fixed_small", "num_train_timesteps": 500}, diffusers.DDPMScheduler),
])
def test_scheduler_config_follows_the_training_schedule(overrides, expected, cls, tmp_path: Path) -> None:
    cfg = scheduler_of(overrides, tmp_path)
    assert cfg["_class_name"] == cls.__name__
    assert {k: cfg[k] for k in expected} == pytest.approx(expected)
    ours = hydra.utils.instantiate(compose_train(["model=unet_small", *overrides], tmp_path).model.diffusion.noise_schedule)
    loaded = cls.from_config(cfg)  # diffusers reads it and builds the same ᾱ (float32 β)
    assert {k: loaded.config[k] for k in expected} == pytest.approx(expected)
    assert torch.allclose(loaded.alphas_cumprod.double(), ours.alphas_cumprod, atol=2e-6)


def test_a_custom_cosine_travels_as_trained_betas(tmp_path: Path) -> None:
    cfg = scheduler_of(["model/diffusion/noise_schedule=cosine", "model.diffusion.noise_schedule.s=0.02"], tmp_path)
    assert len(cfg["trained_betas"]) == 1000
    loaded = diffusers.DDIMScheduler.from_config(cfg)
    ours = hydra.utils.instantiate({"_target_": "ldmlab.diffusion.schedules.cosine", "s": 0.02})
    assert torch.allclose(loaded.alphas_cumprod.double(), ours.alphas_cumprod, atol=2e-6)


def test_a_class_conditional_checkpoint_gets_unet_and_vae_only(
    tiny_assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = ["model=unet_small", f"model.vae.path={tiny_assets['vae']}", "model.latent_scale=0.8"]
    ckpt = save_checkpoint(overrides, tmp_path, ema=False)
    paths = write_pipeline(ckpt, tmp_path / "pipe")
    assert paths == [tmp_path / "pipe/unet", tmp_path / "pipe/vae"]
    assert not (tmp_path / "pipe/model_index.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and NEEDS_TEXT in err[0] and "class-conditional" in err[0]


def test_cli_refuses_ckpt_with_other_formats_or_parts(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--from", "ldmlab", "--to", "sd", "--ckpt", "x.ckpt", "--out", str(tmp_path / "m.safetensors")])
    with pytest.raises(SystemExit):
        main(["--from", "ldmlab", "--to", "diffusers", "--ckpt", "x.ckpt", "--unet", "x.ckpt", "--out", "d"])


@pytest.mark.slow
def test_a_trained_text_model_converts_to_a_pipeline(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    """Two `train.py` steps of the text model on synthetic latents with CLIP-shaped context: the real checkpoint
    (EMA on, latent scale estimated) becomes a pipeline whose DDIM images equal sample()'s."""
    from conftest import run_train

    run = tmp_path / "run"
    run_train([*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "model.latent_scale=null",
               "data=synthetic_latents", "data.shape=[4,8,8]", "data.context_shape=[77,32]", "data.batch_size=4",
               "data.num_workers=0", "data.pool=8", "data.val_samples=4", "trainer.max_steps=2",
               "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0", "callbacks.image_grids=null",
               f"hydra.run.dir={run}"], cwd=tmp_path)
    last = run / "checkpoints/last.ckpt"
    main(["--from", "ldmlab", "--to", "diffusers", "--ema", "--ckpt", str(last), "--out", str(tmp_path / "pipe")])
    module = load_ldm(last, use_ema=True)
    ours = module.sample(PROMPTS, 2, 2.0, seed=0)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    assert pipe.vae.config.scaling_factor == pytest.approx(float(module.latent_scale))
    x_T = torch.randn((2, *LATENT), generator=torch.Generator().manual_seed(0))
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=5, guidance_scale=2.0, latents=x_T,
                  output_type="pt").images * 2 - 1
    assert (ours - theirs).abs().max() < TOLERANCE


def test_settings_the_pipeline_would_change_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """StableDiffusionPipeline rewrites steps_offset to 1; DDIMScheduler steps by T // n off 'leading' spacing."""
    from ldmlab.convert.pipeline import _check_scheduler

    _check_scheduler(scheduler_of(["model/diffusion/sampler=ddpm", "model.diffusion.sampler.num_steps=50"], tmp_path))
    _check_scheduler(scheduler_of(["model.diffusion.sampler.spacing=trailing"], tmp_path))
    err = capsys.readouterr().err
    assert "steps_offset=0" in err and "#12633" in err


def test_a_learned_variance_exports_ddpm_learned_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """model/diffusion/variance=learned: DDPMScheduler(variance_type=learned_range), the only diffusers scheduler that splits
    a 2C output; the model sampler's spacing and steps kept, what differs said on stderr."""
    cfg = scheduler_of(["model/diffusion/variance=learned"], tmp_path)  # unet_small samples with DDIM, 25 steps
    assert cfg["_class_name"] == "DDPMScheduler" and cfg["variance_type"] == "learned_range"
    assert (cfg["timestep_spacing"], cfg["steps_offset"], cfg["_ldmlab_sampler"]) == ("leading", 1, {"num_steps": 25})
    assert diffusers.DDPMScheduler.from_config(cfg).config.variance_type == "learned_range"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "DDIMScheduler cannot read" in err[0] and "guidance > 1" in err[1]
    scheduler_of(["model/diffusion/variance=learned", "model/diffusion/sampler=ddpm"], tmp_path)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # the guidance note only


def test_a_learned_variance_pipeline_draws_ldmlab_images(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    """A learned-variance text model's pipeline: 5 strided DDPM steps (linspace: both end at t = 0) with Σ_θ from
    the U-Net's second half, the same injected noise (one generator after x_T), guidance 1: sample()'s images."""
    overrides = [*text_overrides(tiny_assets["clip32"], tiny_assets["vae"]), "model/diffusion/variance=learned",
                 "model/diffusion/sampler=ddpm", "model.diffusion.sampler.spacing=linspace", "model.diffusion.sampler.num_steps=5"]
    ckpt = save_checkpoint(overrides, tmp_path, ema=False)
    main(["--from", "ldmlab", "--to", "diffusers", "--ckpt", str(ckpt), "--out", str(tmp_path / "pipe")])
    module = load_ldm(ckpt)
    assert module.unet.config["out_channels"] == 8
    ours = module.sample(PROMPTS, 2, 1.0, seed=3)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.out_channels == 8 and pipe.scheduler.config.variance_type == "learned_range"
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((2, *LATENT), generator=g)  # as sample() draws it, then its step noise from the same g
    theirs = pipe(PROMPTS, height=32, width=32, num_inference_steps=5, guidance_scale=1.0, latents=x_T,
                  generator=g, output_type="pt").images * 2 - 1
    assert ours.std() > 0.01 and (ours - theirs).abs().max() < TOLERANCE
