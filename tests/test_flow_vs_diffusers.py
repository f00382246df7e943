"""Flow-matching samplers against diffusers 0.42.1 (a test-only reference): the σ grid with SD3's shift equals
the schedulers' `sigmas`, and the same model function from the same noise gives the same trajectory step by step."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from ldmlab.diffusion import FlowMatching, StepInfo, flow_euler_sample, flow_heun_sample, flow_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear velocity that depends on x, on t (the network's time σ·T) and mixes channels."""
    mixed = torch.einsum("oc,bchw->bohw", W.to(x.dtype), x)
    return torch.tanh(mixed) + (t.to(x.dtype) / 1000).reshape(-1, 1, 1, 1) * x - 0.3


def x_T() -> torch.Tensor:
    return torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))


def reference(scheduler, n: int) -> tuple[list[torch.Tensor], list[float]]:
    """diffusers' loop (as its SD3 pipeline): samples after each step and the times the model saw."""
    scheduler.set_timesteps(n)
    x, xs, ts = x_T(), [], []
    for t in scheduler.timesteps:
        ts.append(float(t))
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
        xs.append(x)
    return xs, ts


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 7, 28])
def test_sigma_grid_equals_diffusers(shift: float, n: int) -> None:
    for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler):
        s = cls(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(n)
        ours = flow_sigmas(n, shift, 1000)
        if cls is FlowMatchHeunDiscreteScheduler:  # it repeats each interior σ for the corrector
            ours = torch.cat([ours[:1], ours[1:-1].repeat_interleave(2), ours[-1:]])
        torch.testing.assert_close(ours.float(), s.sigmas, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_trajectory_equals_diffusers(shift: float) -> None:
    n = 12
    ref, ref_t = reference(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift), n)
    steps: list[StepInfo] = []
    seen: list[float] = []

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        return model(x, t)

    out = flow_euler_sample(spy, x_T(), None, FlowMatching(shift=shift), num_steps=n, callback=steps.append)
    assert seen == pytest.approx(ref_t, rel=1e-6)
    for i, (ours, theirs) in enumerate(zip([s.x for s in steps], ref)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=lambda m, i=i: f"step {i}: {m}")
    torch.testing.assert_close(out, ref[-1], rtol=1e-6, atol=1e-6)


def test_euler_shift_comes_from_the_objective_unless_given() -> None:
    ref, _ = reference(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), 6)
    out = flow_euler_sample(model, x_T(), None, FlowMatching(shift=3.0), num_steps=6)  # shift=None
    torch.testing.assert_close(out, ref[-1], rtol=1e-6, atol=1e-6)
    other = flow_euler_sample(model, x_T(), None, FlowMatching(shift=3.0), num_steps=6, shift=1.0)
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_equals_diffusers(shift: float) -> None:
    n = 10
    ref, ref_t = reference(FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=shift), n)
    seen: list[float] = []

    def spy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t[0]))
        return model(x, t)

    steps: list[StepInfo] = []
    out = flow_heun_sample(spy, x_T(), None, FlowMatching(shift=shift), num_steps=n, callback=steps.append)
    assert len(seen) == 2 * n - 1 and seen == pytest.approx(ref_t, rel=1e-6)
    # diffusers' state after each corrector (odd index) and after the final Euler step = ours after each step;
    # 1e-5: diffusers forms its slope in float32 as (x − (x − σ·v))/σ, a round trip that costs a few ulp per step
    for i, (ours, theirs) in enumerate(zip([s.x for s in steps], ref[1::2] + ref[-1:])):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")
    torch.testing.assert_close(out, ref[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_training_densities_equal_diffusers_sd3_sampling(density: str) -> None:
    """Unshifted training times equal diffusers' `compute_density_for_timestep_sampling` (its SD3 scripts) draw
    for draw from equally seeded generators."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from ldmlab.diffusion import flow_timesteps

    theirs = compute_density_for_timestep_sampling(density, 64, logit_mean=0.3, logit_std=0.7, mode_scale=1.29,
                                                   generator=torch.Generator().manual_seed(7))
    ours = flow_timesteps(64, density, 0.3, 0.7, 1.29, shift=1.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
