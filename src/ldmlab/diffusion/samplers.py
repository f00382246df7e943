"""Samplers: plain functions `sample(denoise, x_T, schedule, prediction, num_steps, …) -> x0`.

`denoise(x_t, t) -> model_out` is the network (wrapped in guidance if wanted); it receives x_t on the
variance-preserving scale and t of shape (B,): int64 training timesteps, or float32 (possibly fractional)
for Euler. `x_T` is unit-variance Gaussian noise. Injected noise comes from `noise_fn(x) -> ε` if given,
else from `generator` with torch.randn(x.shape, dtype=x.dtype), the same draws in the same order as
diffusers' schedulers. Coefficients are computed in float64 (Python floats) and applied to x in its dtype.
`callback(StepInfo)` runs after every step with the new x (VP scale) and the step's x̂0.
A network with a learned variance (Improved DDPM, `variance.py`) returns 2C channels for C-channel x: the first C
are the prediction, the rest the variance interpolation, which DDPM and DDIM (η > 0) use for their noise and the
deterministic samplers ignore.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ldmlab.diffusion.parameterization import Prediction
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.timesteps import (
    Spacing,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    ve_sigmas,
)
from ldmlab.diffusion.variance import learned_log_variance, posterior_mean, posterior_variance, split_output

__all__ = ["StepInfo", "ddim_sample", "ddpm_sample", "dpmpp_2m_sample", "euler_sample"]

Denoise = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]
Threshold = Callable[[Tensor], Tensor]


class StepInfo(NamedTuple):
    """What a progress callback sees after step i of n: timestep t, the new sample x and the step's x̂0."""

    i: int
    num_steps: int
    t: float
    x: Tensor
    x0: Tensor


Callback = Callable[[StepInfo], None]


def _noise_source(generator: torch.Generator | None, noise_fn: NoiseFn | None) -> NoiseFn:
    """The injected-noise source: `noise_fn` if given, else N(0, I) from `generator` (diffusers' randn_tensor)."""
    if noise_fn is not None:
        return noise_fn

    def draw(x: Tensor) -> Tensor:
        device = generator.device if generator is not None else x.device  # draw where the generator lives
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

    return draw


class Denoised(NamedTuple):
    """What one network call gives a step: x̂0, ε̂ and the variance output v (None: the network has none)."""

    x0: Tensor
    eps: Tensor
    v: Tensor | None


def _model_x0_eps(
    denoise: Denoise,
    prediction: Prediction,
    x: Tensor,
    t: float,
    alpha_bar: float,
    threshold: Threshold | None,
) -> Denoised:
    """Run the model at (x_t, t) and read off (x̂0, ε̂, v); thresholding applies to x̂0 only (as diffusers).

    An int t reaches the model as an int64 batch, a float t (Euler's grid) as float32, as in diffusers."""
    # filled on the device: a host tensor copied per step would make every step wait for the GPU queue
    t_batch = torch.full((x.shape[0],), t, dtype=torch.int64 if isinstance(t, int) else torch.float32,
                         device=x.device)
    out, v = split_output(denoise(x, t_batch).to(x.dtype), x.shape[1])
    alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    x0, eps = prediction.x0_at(out, x, alpha, sigma), prediction.eps_at(out, x, alpha, sigma)
    return Denoised(threshold(x0) if threshold is not None else x0, eps, v)


def _step_std(v: Tensor | None, a_t: float, a_prev: float, fixed: str) -> Tensor | float:
    """σ of the step t → t_prev: the network's Σ_θ^½ where it outputs v (Improved DDPM eq. 15, on the step's β and
    β̃ as in its respaced sampler, §4), else the fixed β or β̃ (`fixed`: "beta" or "beta_tilde")."""
    beta, beta_tilde = 1.0 - a_t / a_prev, max(posterior_variance(a_t, a_prev), 1e-20)  # β̃ = 0 at ᾱ_prev = 1
    if v is None:
        return (beta if fixed == "beta" else beta_tilde) ** 0.5
    return torch.exp(0.5 * learned_log_variance(v, math.log(beta), math.log(beta_tilde)))


def _sqrt_pos(d: Tensor | float) -> Tensor | float:
    """√max(d, 0) of a float or, elementwise, a tensor."""
    return d.clamp(min=0).sqrt() if isinstance(d, Tensor) else max(d, 0.0) ** 0.5


def _pairs(timesteps: Tensor) -> list[tuple[int, int]]:
    """Consecutive (t, t_prev) of a descending grid; the last t_prev is −1 (= the clean sample)."""
    ts = timesteps.tolist()
    return list(zip(ts, ts[1:] + [-1]))


@torch.no_grad()
def ddpm_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    num_steps: int = 1000,
    variance: Literal["beta_tilde", "beta"] = "beta_tilde",
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    threshold: Threshold | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior of eq. 6–7 over a strided grid."""
    if variance not in ("beta_tilde", "beta"):
        raise ValueError(f"variance must be 'beta_tilde' or 'beta', got {variance!r}")
    ab, noise, x = schedule.alphas_cumprod.tolist(), _noise_source(generator, noise_fn), x_T
    pairs = _pairs(spaced_timesteps(len(ab), num_steps, spacing, steps_offset))
    for i, (t, t_prev) in enumerate(pairs):
        a_t, a_prev = ab[t], (ab[t_prev] if t_prev >= 0 else 1.0)  # β of the jump = 1 − ᾱ_t/ᾱ_prev (§4)
        x0, _, v = _model_x0_eps(denoise, prediction, x, t, a_t, threshold)
        x_new = posterior_mean(x0, x, a_t, a_prev)  # μ̃(x_t, x̂0), eq. 7
        if t_prev >= 0:  # Algorithm 2: no noise on the last step
            x_new = x_new + _step_std(v, a_t, a_prev, variance) * noise(x)  # β or β̃ (eq. 7), or the learned Σ_θ
        x = x_new
        if callback is not None:
            callback(StepInfo(i, len(pairs), t, x, x0))
    return x


@torch.no_grad()
def ddim_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    threshold: Threshold | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): η = 0 is deterministic, η = 1 is DDPM with σ² = β̃.

    The step goes to the next timestep of the grid (diffusers' DDIMScheduler instead always steps back by
    T // n, which differs for "linspace" and for "trailing" when n does not divide T: diffusers #12633).
    set_alpha_to_one=False ends at ᾱ_0 instead of 1 (Stable Diffusion's scheduler config).
    """
    ab, noise, x = schedule.alphas_cumprod.tolist(), _noise_source(generator, noise_fn), x_T
    final = 1.0 if set_alpha_to_one else ab[0]
    pairs = _pairs(spaced_timesteps(len(ab), num_steps, spacing, steps_offset))
    for i, (t, t_prev) in enumerate(pairs):
        a_t, a_prev = ab[t], (ab[t_prev] if t_prev >= 0 else final)
        x0, eps, v = _model_x0_eps(denoise, prediction, x, t, a_t, threshold)
        noisy = eta > 0 and a_prev < 1.0  # β̃ = 0 on a jump to ᾱ = 1: no noise
        # σ_t(η) = η·β̃^½ (eq. 16), with a learned variance η·Σ_θ^½
        std = eta * _step_std(v, a_t, a_prev, "beta_tilde") if noisy else 0.0
        x = a_prev**0.5 * x0 + _sqrt_pos(1 - a_prev - std**2) * eps  # eq. 12
        if noisy:
            x = x + std * noise(x)
        if callback is not None:
            callback(StepInfo(i, len(pairs), t, x, x0))
    return x


@torch.no_grad()
def dpmpp_2m_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    num_steps: int = 25,
    spacing: Spacing = "linspace",
    steps_offset: int = 0,
    threshold: Threshold | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), first order on the first step and on
    the last, which lands on σ = 0. Deterministic: `generator` and `noise_fn` are accepted and unused."""
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset, skip_zero=True)
    sig = ve_sigmas(schedule)[ts].tolist() + [0.0]  # VE σ = σ_t/α_t; λ = log(α/σ) = −log σ_VE
    x, x0_prev, h_prev = x_T, None, 0.0
    for i, t in enumerate(ts.tolist()):
        alpha_s = 1 / math.sqrt(1 + sig[i] ** 2)  # VP α from VE σ
        x0 = _model_x0_eps(denoise, prediction, x, t, alpha_s**2, threshold).x0
        if sig[i + 1] == 0.0:
            x_new = x0  # σ_t = 0 (h = ∞): the first-order update gives x̂0 exactly
        else:
            alpha_t, h = 1 / math.sqrt(1 + sig[i + 1] ** 2), math.log(sig[i] / sig[i + 1])  # h = λ_t − λ_s
            if x0_prev is None:
                d = x0  # first step: first order (DPM-Solver++1, i.e. DDIM)
            else:
                half_inv_r = h / (2 * h_prev)  # 1/(2r), r = h_prev/h
                d = (1 + half_inv_r) * x0 - half_inv_r * x0_prev  # Alg. 2: D_i
            sigma_ratio = (sig[i + 1] * alpha_t) / (sig[i] * alpha_s)  # σ_t/σ_s of the VP process
            x_new = sigma_ratio * x - alpha_t * math.expm1(-h) * d  # Alg. 2 update
            h_prev = h
        x, x0_prev = x_new, x0
        if callback is not None:
            callback(StepInfo(i, len(ts), t, x, x0))
    return x


@torch.no_grad()
def euler_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    num_steps: int = 50,
    spacing: Spacing = "linspace",
    steps_offset: int = 0,
    karras: bool = False,
    threshold: Threshold | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x − x̂0)/σ in VE coordinates x/√ᾱ (Karras et al. 2022,
    Algorithm 1 without its second-order correction), optionally on Karras σ (eq. 5). Deterministic:
    generator/noise_fn are accepted and unused."""
    table = ve_sigmas(schedule)
    ts = spaced_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset, fractional=True)
    sigmas = interp_sigmas(table, ts)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        ts = sigma_to_t(sigmas, table)
    sig = sigmas.tolist() + [0.0]
    # diffusers' init_noise_sigma: σ_0 for linspace/trailing (as k-diffusion), √(σ_0² + 1) for leading
    x = x_T * (sig[0] if spacing != "leading" else math.sqrt(sig[0] ** 2 + 1))
    for i, t in enumerate(ts.tolist()):
        alpha = 1 / math.sqrt(1 + sig[i] ** 2)  # VE → VP: x_t = α·x, σ_VP = α·σ
        x0 = _model_x0_eps(denoise, prediction, x * alpha, t, alpha**2, threshold).x0  # t: float
        x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])  # Euler step with d = (x − x̂0)/σ
        if callback is not None:
            callback(StepInfo(i, len(ts), t, x / math.sqrt(1 + sig[i + 1] ** 2), x0))
    return x
