"""ODE samplers of the flow-matching objective: dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (data).

Same call as the other samplers, `sample(denoise, x_T, schedule, prediction, num_steps, …)`, so CFG wraps the
network as for them (`classifier_free_guidance`) and the module calls every sampler alike. `prediction` must be
the `FlowMatching` objective (its `num_timesteps` scales σ to the network's time, its `shift` is the default
shift); `schedule` is accepted and unused. The σ grid and the updates are diffusers' `FlowMatchEulerDiscrete-`
and `FlowMatchHeunDiscreteScheduler` (tests/test_flow_vs_diffusers.py). Deterministic: `generator` and
`noise_fn` are accepted and unused.
"""

from __future__ import annotations

import numpy as np  # diffusers builds the grid with np.linspace
import torch
from torch import Tensor

from ldmlab.diffusion.flow import FlowMatching, shift_sigmas
from ldmlab.diffusion.parameterization import Prediction
from ldmlab.diffusion.samplers import Callback, Denoise, NoiseFn, StepInfo
from ldmlab.diffusion.schedules import NoiseSchedule

__all__ = ["flow_euler_sample", "flow_heun_sample", "flow_sigmas"]


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train: int = 1000) -> Tensor:
    """The descending σ grid of n steps plus the final 0, float64, as diffusers' FlowMatch schedulers build it:
    linspace from 1 to σ_min = shift(1/T), then shifted (Esser et al. 2024, §5.3.2) — so σ_min is shifted twice,
    as there."""
    if num_steps < 1:
        raise ValueError(f"model.diffusion.sampler.num_steps={num_steps} must be >= 1, e.g. num_steps=28")
    sigma_min = shift_sigmas(1.0 / num_train, shift)
    grid = torch.from_numpy(np.linspace(1.0, sigma_min, num_steps))
    return torch.cat([shift_sigmas(grid, shift), grid.new_zeros(1)])


def _velocity(denoise: Denoise, x: Tensor, sigma: float, num_train: int) -> Tensor:
    """The network's v at (x, σ); it sees the time σ·T as a float32 batch (diffusers: `timesteps = σ·T`)."""
    t = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device) * num_train
    return denoise(x, t).to(x.dtype)


def _setup(prediction: Prediction, num_steps: int, shift: float | None) -> tuple[FlowMatching, list[float]]:
    """The objective and the σ grid (shift None = the objective's training shift)."""
    if not isinstance(prediction, FlowMatching):
        raise TypeError(f"flow samplers integrate a velocity, but the model predicts {prediction.name}: "
                         "set model/diffusion/prediction=flow, or pick a sampler for it (ddim, ddpm, euler, dpmpp_2m)")
    shift = prediction.shift if shift is None else shift
    return prediction, flow_sigmas(num_steps, shift, prediction.num_timesteps).tolist()


@torch.no_grad()
def flow_euler_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule | None,
    prediction: Prediction,
    num_steps: int = 28,
    shift: float | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler on dx/dσ = v: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i) (Liu et al. 2023, "Rectified Flow";
    SD3's sampler, diffusers' FlowMatchEulerDiscreteScheduler)."""
    flow, sig = _setup(prediction, num_steps, shift)
    x = x_T
    for i in range(num_steps):
        v = _velocity(denoise, x, sig[i], flow.num_timesteps)
        x0 = flow.x0_at(v, x, 1 - sig[i], sig[i])
        x = x + (sig[i + 1] - sig[i]) * v
        if callback is not None:
            callback(StepInfo(i, num_steps, sig[i] * flow.num_timesteps, x, x0))
    return x


@torch.no_grad()
def flow_heun_sample(
    denoise: Denoise,
    x_T: Tensor,
    schedule: NoiseSchedule | None,
    prediction: Prediction,
    num_steps: int = 28,
    shift: float | None = None,
    generator: torch.Generator | None = None,
    noise_fn: NoiseFn | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method on dx/dσ = v, Euler on the last step to σ = 0 (Karras et al. 2022, Algorithm 1
    without churn; diffusers' FlowMatchHeunDiscreteScheduler): 2n − 1 network calls."""
    flow, sig = _setup(prediction, num_steps, shift)
    x = x_T
    for i in range(num_steps):
        v = _velocity(denoise, x, sig[i], flow.num_timesteps)
        x0, dt = flow.x0_at(v, x, 1 - sig[i], sig[i]), sig[i + 1] - sig[i]
        x_euler = x + dt * v
        if sig[i + 1] > 0:  # trapezoid: the mean of the slopes at both ends (Alg. 1, line 7–8)
            v_next = _velocity(denoise, x_euler, sig[i + 1], flow.num_timesteps)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_euler
        if callback is not None:
            callback(StepInfo(i, num_steps, sig[i] * flow.num_timesteps, x, x0))
    return x

