"""The learned variance against diffusers 0.42.1's DDPMScheduler (variance_type="learned_range"): its posterior
variance, its `_get_variance` of a predicted v, and `step` on a 2C model output, full grid and strided (Improved
DDPM §4's respacing). diffusers is handed our float64 ᾱ, so the comparison isolates the formulas."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler

from ldmlab.diffusion import (
    EpsPrediction,
    VPrediction,
    cosine,
    ddpm_sample,
    learned_log_variance,
    posterior_mean,
    posterior_variance,
    scaled_linear,
)
from ldmlab.diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

T = 1000
PREDICTIONS = {"eps": (EpsPrediction(), "epsilon"), "v": (VPrediction(), "v_prediction")}
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5


def scheduler(schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading",
              prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPMScheduler with learned_range on our float64 ᾱ (set_timesteps(num_steps) unless None: the full grid)."""
    sched = DDPMScheduler(num_train_timesteps=T, variance_type="learned_range", clip_sample=False,
                          timestep_spacing=spacing, prediction_type=prediction_type)
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    if num_steps is not None:
        sched.set_timesteps(num_steps)
    return sched


def grid(sched: DDPMScheduler) -> list[tuple[int, int]]:
    """(t, t_prev) of the scheduler's steps, t_prev as diffusers' previous_timestep (−1 after the last)."""
    ts = sched.timesteps.tolist() if sched.num_inference_steps else list(range(T - 1, -1, -1))
    return [(t, int(sched.previous_timestep(t))) for t in ts]


@pytest.mark.parametrize("make", [scaled_linear, cosine])
@pytest.mark.parametrize("num_steps", [None, 20])
def test_posterior_and_learned_variance_equal_get_variance(make, num_steps: int | None) -> None:
    """β̃ = _get_variance(fixed_small) and eq. 15's log Σ = _get_variance(learned_range) to 1e-6, every step."""
    schedule = make(T)
    sched, ab = scheduler(schedule, num_steps), schedule.alphas_cumprod
    v = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)  # inside and outside [−1, 1]: neither side clamps
    for t, t_prev in grid(sched):
        if t_prev < 0:
            continue  # no noise on the last step (ours never reads Σ there, diffusers' β̃ is its 1e-20 floor)
        a_t, a_prev = ab[t], ab[t_prev]
        beta_tilde = posterior_variance(a_t, a_prev)
        assert sched._get_variance(t, variance_type="fixed_small").item() == pytest.approx(beta_tilde.item(),
                                                                                          rel=1e-6)
        ours = learned_log_variance(v, torch.log(1 - a_t / a_prev), torch.log(beta_tilde))
        theirs = sched._get_variance(t, predicted_variance=v, variance_type="learned_range")
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_posterior_mean_equals_step_of_an_x0_model() -> None:
    """diffusers' step with prediction_type="sample" is μ̃(x_t, x0) + its own √β̃·z (z: the same seeded draw)."""
    schedule = scaled_linear(T)
    sched = DDPMScheduler(num_train_timesteps=T, variance_type="fixed_small", clip_sample=False,
                          prediction_type="sample")
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    x0, x_t = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)), torch.randn(
        2, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    for t in (1, 17, 500, 999):
        prev = sched.step(x0, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        a_t, a_prev = schedule.alphas_cumprod[t].item(), schedule.alphas_cumprod[t - 1].item()
        want = posterior_mean(x0, x_t, a_t, a_prev) + posterior_variance(a_t, a_prev) ** 0.5 * z
        torch.testing.assert_close(prev, want, rtol=1e-5, atol=1e-6)


def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A 2C stand-in network: a smooth t-dependent prediction and a variance output v spanning [−1.2, 1.2]."""
    tt = t.float().reshape(-1, 1, 1, 1) / T
    mean = torch.tanh((W @ x.flatten(2)).view_as(x)) * (1 - tt) + 0.3 * tt * x + 0.1
    return torch.cat([mean, 1.2 * torch.tanh(x - 2 * tt + 0.5)], 1)


@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("num_steps, spacing", [(None, "leading"), (20, "leading"), (20, "linspace")])
def test_ddpm_step_on_2c_outputs_equals_diffusers(pred: str, num_steps: int | None, spacing: str) -> None:
    """Our DDPM sampler on the 2C output = DDPMScheduler.step(variance_type="learned_range") under the same noise,
    on the full grid and on the strided grid (β of each jump, Improved DDPM §4)."""
    schedule = scaled_linear(T)
    sched = scheduler(schedule, num_steps, spacing, PREDICTIONS[pred][1])
    assert grid(sched)[-1][0] == 0  # ends at t = 0: neither library adds noise on that last step
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    ours: list[torch.Tensor] = []
    ddpm_sample(denoise, x_T, schedule, PREDICTIONS[pred][0], num_steps or T, spacing=spacing,
                generator=torch.Generator().manual_seed(4), callback=lambda s: ours.append(s.x))
    x, g, theirs = x_T.clone(), torch.Generator().manual_seed(4), []
    for t in sched.timesteps:
        x = sched.step(denoise(x, t), t, x, generator=g).prev_sample
        theirs.append(x)
    assert len(ours) == len(theirs) == (num_steps or T)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=lambda m, i=i: f"{i}: {m}")
    assert math.isfinite(ours[-1].abs().max().item())
