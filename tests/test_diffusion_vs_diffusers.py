"""ldmlab.diffusion against diffusers 0.42.1 (reference implementation; a test-only dependency).

Same denoise function, same initial noise, same injected noise (equally seeded generators) → the same
trajectory, step by step, within 1e-5 relative in float32. Two ways of sharing the schedule:
- `diffusers_schedule=True` (the SD schedule): each library builds ᾱ itself (diffusers in float32);
- otherwise diffusers is handed our float64 ᾱ, so the comparison isolates the sampler algorithm from
  diffusers' float32 rounding of ᾱ and of 1 − ᾱ (which reaches 1e-4 relative on the cosine schedule's σ).
The schedules themselves are compared separately (test_alphas_cumprod_*).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as hf_rescale

from ldmlab.diffusion import (
    EpsPrediction,
    VPrediction,
    X0Prediction,
    cosine,
    ddim_sample,
    ddpm_linear,
    ddpm_sample,
    dpmpp_2m_sample,
    dynamic_threshold,
    euler_sample,
    scaled_linear,
    static_threshold,
)
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.timesteps import spaced_timesteps

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]  # tiny tensors: see conftest.one_thread

T, N = 1000, 20
SCHEDULES = {  # ours, diffusers' kwargs
    "ddpm_linear": (ddpm_linear, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
    "scaled_linear": (
        scaled_linear,
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    ),
    "cosine": (cosine, {"beta_schedule": "squaredcos_cap_v2"}),
}
PREDICTIONS = {
    "eps": (EpsPrediction(), "epsilon"),
    "v": (VPrediction(), "v_prediction"),
    "x0": (X0Prediction(), "sample"),
}
SPACINGS = ["linspace", "leading", "trailing"]
OFFSET = 1  # SD's steps_offset; diffusers applies it to "leading" only
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5




def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth, t-dependent stand-in for a network; t is 0-d (diffusers) or (B,) (ours)."""
    tt = t.float().reshape(-1, 1, 1, 1) / T
    return torch.tanh((W @ x.flatten(2)).view_as(x)) * (1 - tt) + 0.3 * tt * x + 0.1


def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def ours(sampler: Callable, schedule: NoiseSchedule, pred: str, **kw) -> list[torch.Tensor]:
    """Our trajectory: x after every step, on the VP scale."""
    traj: list[torch.Tensor] = []
    sampler(denoise, x_T(), schedule, PREDICTIONS[pred][0], N, callback=lambda s: traj.append(s.x), **kw)
    return traj


def theirs(cls, schedule: NoiseSchedule, pred: str, share: bool, step_kw: dict | None = None, **config):
    """diffusers' trajectory with the pipeline loop (init_noise_sigma, scale_model_input, step), on the VP scale."""
    sched = cls(num_train_timesteps=T, prediction_type=PREDICTIONS[pred][1], **config)
    if share:
        _share_alphas(sched, schedule)
    sched.set_timesteps(N)
    x, traj, g = x_T() * sched.init_noise_sigma, [], gen()
    for i, t in enumerate(sched.timesteps):
        if cls is DDIMScheduler:
            _fix_ddim_prev(sched, i)
        x = sched.step(
            denoise(sched.scale_model_input(x, t), t), t, x, generator=g, **(step_kw or {})
        ).prev_sample
        traj.append(
            x / (sched.sigmas[i + 1] ** 2 + 1) ** 0.5 if cls is EulerDiscreteScheduler else x
        )  # VE → VP
    return traj


def _share_alphas(sched, schedule: NoiseSchedule) -> None:
    """Give diffusers our float64 ᾱ (with its own 2⁻²⁴ stand-in for ᾱ = 0 where it uses one)."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if isinstance(sched, (EulerDiscreteScheduler, DPMSolverMultistepScheduler)) and alphas_cumprod[-1] == 0:
        alphas_cumprod[-1] = 2.0**-24
    sched.alphas_cumprod = alphas_cumprod
    if isinstance(sched, DDIMScheduler) and not sched.config.set_alpha_to_one:
        sched.final_alpha_cumprod = alphas_cumprod[0]


def _fix_ddim_prev(sched: DDIMScheduler, i: int) -> None:
    """diffusers' DDIMScheduler.step reads ᾱ at t − T//n rather than at the grid's next timestep (issue #12633;
    differs for "linspace" and for "trailing" when n ∤ T). Put the next timestep's ᾱ where it reads it."""
    if not hasattr(sched, "_true_alphas"):
        sched._true_alphas = sched.alphas_cumprod.clone()
    ts, ac = sched.timesteps.tolist(), sched._true_alphas
    t, t_next, stride = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1), T // sched.num_inference_steps
    sched.alphas_cumprod = ac.clone()
    if t - stride >= 0 and t - stride != t_next:
        sched.alphas_cumprod[t - stride] = ac[t_next] if t_next >= 0 else sched.final_alpha_cumprod
    assert t - stride >= 0 or t_next < 0, "diffusers would jump to the final ᾱ too early"


def assert_trajectories_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """Every step equal within rtol, relative to the step's largest |value| (elementwise near zero)."""
    assert len(a) == len(b) == N
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.isfinite(x).all(), f"step {i} not finite"
        torch.testing.assert_close(
            x, y, rtol=rtol, atol=rtol * y.abs().max().item(), msg=lambda m, i=i: f"step {i}: {m}"
        )


# (schedule, zero terminal SNR, share ᾱ): SD's schedule built by each library on its own, every schedule
# (incl. zero terminal SNR, with v and x0 only: ε is undefined at ᾱ = 0) on shared ᾱ.
COMBOS = [("scaled_linear", False, False)] + [(s, z, True) for s in SCHEDULES for z in (False, True)]
CASES = [
    pytest.param(s, z, p, sp, share, id=f"{s}{'+zsnr' if z else ''}-{p}-{sp}-{'shared' if share else 'own'}")
    for s, z, share in COMBOS
    for p in PREDICTIONS
    for sp in SPACINGS
    if not (z and p == "eps")
]
CASE_ARGS = "sched_name,zsnr,pred,spacing,share"


def setup(sched_name: str, zsnr: bool, spacing: str) -> tuple[NoiseSchedule, dict]:
    """Our schedule and the matching diffusers config."""
    schedule = SCHEDULES[sched_name][0](num_timesteps=T, zero_terminal_snr=zsnr)
    config = dict(
        SCHEDULES[sched_name][1], timestep_spacing=spacing, steps_offset=OFFSET, rescale_betas_zero_snr=zsnr
    )
    return schedule, config


@pytest.mark.parametrize(CASE_ARGS, CASES)
@pytest.mark.parametrize("variance,variance_type", [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
def test_ddpm_matches_diffusers(sched_name, zsnr, pred, spacing, share, variance, variance_type):
    schedule, config = setup(sched_name, zsnr, spacing)
    g = gen()
    a = ours(
        ddpm_sample, schedule, pred, variance=variance, spacing=spacing, steps_offset=OFFSET, generator=g
    )
    b = theirs(DDPMScheduler, schedule, pred, share, clip_sample=False, variance_type=variance_type, **config)
    t_last = int(spaced_timesteps(T, N, spacing, OFFSET)[-1])
    if variance == "beta" and t_last > 0:
        # diffusers adds √β·z on a last step with t > 0 (its next draw from the same generator);
        # DDPM Algorithm 2 adds no noise on the last step, nor do we.
        z = torch.randn(b[-1].shape, generator=g)
        b[-1] = b[-1] - (1 - schedule.alphas_cumprod[t_last].item()) ** 0.5 * z
    assert_trajectories_close(a, b)


@pytest.mark.parametrize(CASE_ARGS, CASES)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(sched_name, zsnr, pred, spacing, share, eta):
    schedule, config = setup(sched_name, zsnr, spacing)
    a = ours(ddim_sample, schedule, pred, eta=eta, spacing=spacing, steps_offset=OFFSET, generator=gen())
    b = theirs(DDIMScheduler, schedule, pred, share, step_kw={"eta": eta}, clip_sample=False, **config)
    assert_trajectories_close(a, b)


@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_dpmpp_2m_matches_diffusers(sched_name, zsnr, pred, spacing, share):
    schedule, config = setup(sched_name, zsnr, spacing)
    a = ours(dpmpp_2m_sample, schedule, pred, spacing=spacing, steps_offset=OFFSET)
    b = theirs(DPMSolverMultistepScheduler, schedule, pred, share, **config)
    assert_trajectories_close(a, b)


@pytest.mark.parametrize(CASE_ARGS, CASES)
@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers(sched_name, zsnr, pred, spacing, share, karras):
    schedule, config = setup(sched_name, zsnr, spacing)
    a = ours(euler_sample, schedule, pred, spacing=spacing, steps_offset=OFFSET, karras=karras)
    b = theirs(EulerDiscreteScheduler, schedule, pred, share, use_karras_sigmas=karras, **config)
    assert_trajectories_close(a, b)


@pytest.mark.parametrize("num_timesteps", [1000, 50])
@pytest.mark.parametrize("zsnr", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alphas_cumprod_match_diffusers(name, zsnr, num_timesteps):
    schedule = SCHEDULES[name][0](num_timesteps=num_timesteps, zero_terminal_snr=zsnr)
    hf = DDPMScheduler(num_train_timesteps=num_timesteps, rescale_betas_zero_snr=zsnr, **SCHEDULES[name][1])
    hf_plain = DDPMScheduler(num_train_timesteps=num_timesteps, **SCHEDULES[name][1])
    # diffusers' float32 β, accumulated in float64 (its rescale function is dtype-generic): 1e-7
    betas64 = hf_rescale(hf_plain.betas.double()) if zsnr else hf_plain.betas.double()
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - betas64, 0), rtol=0, atol=1e-7)
    # diffusers' own float32 cumprod and rescale carry float32 rounding (≤ 1.05e-6 measured)
    torch.testing.assert_close(schedule.alphas_cumprod, hf.alphas_cumprod.double(), rtol=0, atol=2e-6)
    assert schedule.alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 20, 30, 999])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_spaced_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    config = {"num_train_timesteps": T, "timestep_spacing": spacing, "steps_offset": steps_offset}
    for cls, kw in [
        (DDPMScheduler, {}),
        (DDIMScheduler, {}),
        (DPMSolverMultistepScheduler, {"skip_zero": True}),
        (EulerDiscreteScheduler, {"fractional": True}),
    ]:
        sched = cls(**config)
        sched.set_timesteps(num_steps)
        if sched.timesteps.max() > T - 1:  # diffusers silently leaves the table (e.g. #10003); we refuse
            with pytest.raises(ValueError):
                spaced_timesteps(T, num_steps, spacing, steps_offset, **kw)
            continue
        ts = spaced_timesteps(T, num_steps, spacing, steps_offset, **kw)
        torch.testing.assert_close(
            ts.to(sched.timesteps.dtype), sched.timesteps, rtol=0, atol=1e-4, msg=cls.__name__
        )


@pytest.mark.parametrize("pred", ["eps", "v", "x0"])
def test_thresholding_matches_diffusers(pred):
    schedule, config = setup("scaled_linear", False, "leading")
    static = ours(
        ddpm_sample,
        schedule,
        pred,
        spacing="leading",
        steps_offset=OFFSET,
        generator=gen(),
        threshold=static_threshold,
    )
    unclipped = ours(ddpm_sample, schedule, pred, spacing="leading", steps_offset=OFFSET, generator=gen())
    assert not torch.allclose(static[-1], unclipped[-1])  # the threshold is active on this trajectory
    assert_trajectories_close(
        static, theirs(DDPMScheduler, schedule, pred, False, clip_sample=True, **config)
    )
    dyn = functools.partial(dynamic_threshold, ratio=0.9, max_value=1.5)
    hf_dyn = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
    a = ours(ddim_sample, schedule, pred, spacing="leading", steps_offset=OFFSET, threshold=dyn)
    assert_trajectories_close(a, theirs(DDIMScheduler, schedule, pred, False, **hf_dyn, **config))
    a = ours(dpmpp_2m_sample, schedule, pred, spacing="leading", steps_offset=OFFSET, threshold=dyn)
    assert_trajectories_close(
        a, theirs(DPMSolverMultistepScheduler, schedule, pred, False, **hf_dyn, **config)
    )


def test_ddim_set_alpha_to_one_false_matches_diffusers():
    schedule, config = setup("scaled_linear", False, "leading")
    a = ours(ddim_sample, schedule, "eps", spacing="leading", steps_offset=OFFSET, set_alpha_to_one=False)
    b = theirs(DDIMScheduler, schedule, "eps", False, clip_sample=False, set_alpha_to_one=False, **config)
    assert_trajectories_close(a, b)
    c = ours(ddim_sample, schedule, "eps", spacing="leading", steps_offset=OFFSET, set_alpha_to_one=True)
    assert not torch.allclose(a[-1], c[-1])
