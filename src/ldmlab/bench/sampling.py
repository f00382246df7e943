"""Text-to-image sampling cost: 50 DDIM steps with classifier-free guidance (one batched [uncond; cond]
forward per step) and the VAE decode, SD1.5 U-Net + kl-f8 VAE in bf16, ours against the same loop written
with diffusers' UNet2DConditionModel, DDIMScheduler and AutoencoderKL (what StableDiffusionPipeline runs).
Random weights and random 77×768 prompt embeddings: the cost does not depend on them."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ldmlab import accel
from ldmlab.bench.common import peak_gib
from ldmlab.bench.unet import build_unet, compile_mode
from ldmlab.bench.vae import build_vae

GUIDANCE = 7.5


def ours_sampler(features: set[str], steps: int) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    from ldmlab.diffusion.guidance import classifier_free_guidance
    from ldmlab.diffusion.parameterization import EpsPrediction
    from ldmlab.diffusion.samplers import ddim_sample
    from ldmlab.diffusion.schedules import scaled_linear

    unet, _ = build_unet("ours")
    vae, _, _ = build_vae("ours")
    unet, vae = (m.cuda().eval().to(torch.bfloat16) for m in (unet, vae))
    if "cl" in features:
        accel.to_channels_last(unet), accel.to_channels_last(vae)
    unet_call: Callable = unet
    if "regional" in features:
        accel.compile_model(unet, "regional"), accel.compile_model(vae, "regional")
    if "compile" in features:
        unet_call = torch.compile(unet, mode=compile_mode(features))
        vae.decoder = torch.compile(vae.decoder)
    sample = partial(ddim_sample, num_steps=steps, spacing="leading", steps_offset=1, set_alpha_to_one=False)
    schedule, prediction = scaled_linear(), EpsPrediction()

    @torch.no_grad()
    def run(x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        denoise = classifier_free_guidance(lambda x, t, c: unet_call(x, t, context=c), cond, uncond, GUIDANCE)
        return vae.decode(sample(denoise, x_T, schedule, prediction) / 0.18215)

    return run


def sample_py_sampler(features: set[str], steps: int) -> Callable:
    """What `python sample.py` runs on a GPU: a LatentDiffusionModule in fp32 (SD1.5 U-Net, kl-f8 VAE, a 2-layer
    CLIP stand-in of width 768: prompts are encoded once per batch, not the cost measured here), set up by
    `sample.prepare_for_sampling` (compile=full with feature `compile`, none without), then its `sample()`."""
    import tempfile
    from pathlib import Path

    from ldmlab.diffusion import Diffusion
    from ldmlab.diffusion.parameterization import EpsPrediction
    from ldmlab.diffusion.samplers import ddim_sample
    from ldmlab.diffusion.schedules import scaled_linear
    from ldmlab.lit.conditioning import TextConditioner
    from ldmlab.lit.ldm import LatentDiffusionModule
    from ldmlab.sample import prepare_for_sampling
    from ldmlab.utils.stand_ins import make_tiny_clip

    unet, _ = build_unet("ours")
    vae, _, _ = build_vae("ours")
    with tempfile.TemporaryDirectory() as tmp:
        conditioner = TextConditioner(make_tiny_clip(Path(tmp) / "clip", hidden_size=768))
    sampler = partial(ddim_sample, num_steps=steps, spacing="leading", steps_offset=1, set_alpha_to_one=False)
    module = LatentDiffusionModule(unet, Diffusion(EpsPrediction(), scaled_linear(), sampler=sampler), vae=vae,
                                   conditioner=conditioner).cuda().eval()
    autocast = prepare_for_sampling(module, bf16=True, compile="full" if "compile" in features else "none")

    @torch.no_grad()
    def run(x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x_T.shape
        with autocast:
            return module.sample(["a photograph"] * n, n, GUIDANCE, latent_shape=(4, h, w))

    return run


def diffusers_sampler(features: set[str], steps: int) -> Callable:
    from diffusers import DDIMScheduler

    unet, _ = build_unet("diffusers")
    vae, _, _ = build_vae("diffusers")
    unet, vae = (m.cuda().eval().to(torch.bfloat16) for m in (unet, vae))
    if "cl" in features:
        unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
    if "compile" in features:
        unet, vae.decoder = torch.compile(unet), torch.compile(vae.decoder)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    @torch.no_grad()
    def run(x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(steps, device="cuda")
        x, both = x_T, torch.cat([uncond, cond])
        for t in scheduler.timesteps:
            out_u, out_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            x = scheduler.step(out_u + GUIDANCE * (out_c - out_u), t, x).prev_sample
        return vae.decode(x / 0.18215).sample

    return run


def time_sampling(variant: str, pixels: int = 512, batch: int = 8, steps: int = 50,
                  repeats: int = 2) -> dict[str, float]:
    """Seconds per image of `steps` DDIM steps with CFG + decode for a batch (after one warm-up batch).
    Variant `<ours|diffusers>[+cl][+compile][+ro][+ma][+regional][+cudnn_sdpa][+bench][+c1x1][+cdt]
    [+freeze][+mag]` as in bench.unet, with accel.INDUCTOR_FEATURES, or `sample_py[+compile]`: sample.py's path."""
    return _with_variant(variant, steps, partial(_time_sampler, pixels=pixels, batch=batch, repeats=repeats))


def profile_sampling(variant: str, pixels: int = 512, batch: int = 8, steps: int = 50) -> str:
    """Kernel time of one warm sampling batch (`steps` U-Net calls + decode) by kind (bench.profile)."""
    from ldmlab.bench import profile

    def measure(run: Callable) -> str:
        inputs = sampling_inputs(pixels, batch)
        run(*inputs)  # warm-up: compilation, cuDNN plans
        by_kind, kernels, wall_ms = profile.profile_step(lambda: run(*inputs), steps=1)
        return profile.report(f"sampling {variant}, {pixels} px, batch {batch}, {steps} steps", by_kind,
                              kernels, wall_ms)

    return _with_variant(variant, steps, measure)


def _with_variant(variant: str, steps: int, measure: Callable[[Callable], Any]) -> Any:
    """Build the variant's sampler with its SDPA order, cudnn.benchmark and inductor settings, then measure."""
    from ldmlab.bench.unet import parse_variant, reset_sdpa

    if variant.split("+")[0] == "sample_py":
        impl, features = "sample_py", set(variant.split("+")[1:])
        if features - {"compile"}:
            raise ValueError(f"variant {variant!r}: sample_py takes only +compile (it sets up the rest itself)")
    else:
        impl, features = parse_variant(variant)
    build = {"ours": ours_sampler, "diffusers": diffusers_sampler, "sample_py": sample_py_sampler}[impl]
    if "cudnn_sdpa" in features:  # cuDNN attention first: 1.5-1.7x flash at SD's head width 40 (sdpa part)
        accel.set_sdpa_order(["cudnn", "flash"])
    torch.backends.cudnn.benchmark = "bench" in features
    try:
        with torch._inductor.config.patch(accel.inductor_settings(features)):  # compilation happens in the warm-up call, inside
            return measure(build(features, steps))
    finally:
        reset_sdpa()


def sampling_inputs(pixels: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_T, cond, uncond in bf16 on the GPU."""
    x_T = torch.randn(batch, 4, pixels // 8, pixels // 8, device="cuda", dtype=torch.bfloat16)
    cond, uncond = (torch.randn(batch, 77, 768, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return x_T, cond, uncond


def _time_sampler(run: Callable, pixels: int, batch: int, repeats: int) -> dict[str, float]:
    x_T, cond, uncond = sampling_inputs(pixels, batch)
    t0 = time.perf_counter()
    run(x_T, cond, uncond)  # warm-up: compilation, cuDNN plans
    torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        images = run(x_T, cond, uncond)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    assert images.shape == (batch, 3, pixels, pixels), images.shape
    return {"s_per_img": seconds / batch, "peak_gib": peak_gib(), "warmup_s": warmup}
