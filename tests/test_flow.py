"""Flow matching against closed forms: the exact velocity of a Gaussian (and of a point mass) carries noise to the
analytic x0; the timestep densities have the right law; the training batch's pieces agree; a tiny flow LDM
trains (loss down) and samples through the real Lightning Trainer."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldmlab.diffusion import (
    Diffusion,
    FlowMatching,
    classifier_free_guidance,
    flow_euler_sample,
    flow_heun_sample,
    flow_timesteps,
    mode_density,
    shift_sigmas,
)
from ldmlab.lit.conditioning import ClassConditioner
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.nn.unet import UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")
T = 1000


def gaussian_velocity(mu: float, s: float):
    """E[ε − x0 | x_t = x] for x0 ~ N(mu, s²) per element: x_t ~ N((1−t)mu, (1−t)²s² + t²), so
    v = (t − (1−t)s²)/var_t · (x − (1−t)mu) − mu; its flow maps ε to mu + s·ε (Gaussian quantiles)."""

    def v(x: torch.Tensor, t_net: torch.Tensor) -> torch.Tensor:
        t = (t_net.to(x.dtype) / T).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * mu) - mu

    return v


@pytest.mark.parametrize("sampler, steps, tol", [(flow_euler_sample, 1000, 3e-3), (flow_heun_sample, 100, 1e-4)])
def test_exact_gaussian_velocity_reaches_the_analytic_x0(sampler, steps: int, tol: float) -> None:
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(gaussian_velocity(0.7, 0.5), x_T, None, FlowMatching(), num_steps=steps)
    torch.testing.assert_close(out, 0.7 + 0.5 * x_T, rtol=0, atol=tol)  # measured: 2.3e-3 and 7e-5


@pytest.mark.parametrize("sampler", [flow_euler_sample, flow_heun_sample])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_point_mass_is_reached_exactly_in_few_steps(sampler, shift: float) -> None:
    """A point mass's paths are straight lines (Liu et al. 2023): any step size integrates them exactly."""
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(gaussian_velocity(-1.0, 0.0), x_T, None, FlowMatching(shift=shift), num_steps=3)
    torch.testing.assert_close(out, torch.full_like(x_T, -1.0), rtol=0, atol=1e-8)


def test_euler_error_is_first_order_and_shift_keeps_the_endpoint() -> None:
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v, exact = gaussian_velocity(0.3, 0.5), 0.3 + 0.5 * x_T
    err = [(flow_euler_sample(v, x_T, None, FlowMatching(), num_steps=n) - exact).abs().max().item() for n in (50, 100)]
    assert 1.6 < err[0] / err[1] < 2.4  # halving the step halves the error
    shifted = flow_euler_sample(v, x_T, None, FlowMatching(shift=3.0), num_steps=1000)
    torch.testing.assert_close(shifted, exact, rtol=0, atol=6e-3)  # measured 4.7e-3


def test_shift_formula() -> None:
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigmas(t, 1.0), t)
    assert shift_sigmas(0.0, 3.0) == 0 and shift_sigmas(1.0, 3.0) == 1 and (shift_sigmas(t, 3.0) >= t).all()


def test_logit_normal_density_has_the_right_logit_moments() -> None:
    t = flow_timesteps(200_000, "logit_normal", logit_mean=0.5, logit_std=0.8, generator=torch.Generator().manual_seed(2))
    logit = torch.log(t.double() / (1 - t.double()))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_mode_density_law_and_uniform_limit() -> None:
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mode_density(u, 0.0), 1 - u)  # s = 0: uniform (reflected)
    t = flow_timesteps(100_000, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(4))
    assert 0 <= t.min() and t.max() <= 1
    for u0 in (0.1, 0.3, 0.5, 0.8):  # f decreasing: P(t ≤ f(u0)) = P(u ≥ u0) = 1 − u0
        bound = mode_density(torch.tensor(u0), 1.29)
        assert (t <= bound).float().mean().item() == pytest.approx(1 - u0, abs=0.01)
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert middle > 0.6  # more mass on the middle than uniform's 0.5 (SD3 §3.1)


def test_unknown_density_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"model.diffusion.prediction.density='beta' is unknown"):
        FlowMatching(density="beta")
    with pytest.raises(ValueError, match=r"model.diffusion.prediction.mode_scale=2.0 must be in \[-1, 1.752\]"):
        FlowMatching(density="mode", mode_scale=2.0)
    assert mode_density(torch.linspace(0, 1, 101), 2 / (math.pi - 2)).diff().le(1e-7).all()  # edge: still monotone


def test_training_inputs_are_consistent() -> None:
    flow, x0 = FlowMatching(density="logit_normal", shift=3.0), torch.randn(6, 4, 3, 3)
    g = torch.Generator().manual_seed(5)
    x_t, t_net, target, weight = flow.training_inputs(x0, None, g)
    t = (t_net / T).reshape(-1, 1, 1, 1)
    assert t_net.dtype == torch.float32 and torch.equal(weight, torch.ones(6)) and ((t > 0) & (t < 1)).all()
    torch.testing.assert_close(flow.x0_at(target, x_t, 1 - t, t), x0)  # x_t − t·v = x0
    noise = target + x0
    torch.testing.assert_close(x_t, (1 - t) * x0 + t * noise)
    torch.testing.assert_close(flow.eps_at(target, x_t, 1 - t, t), noise, rtol=1e-5, atol=1e-5)


def test_min_snr_weight_is_min_snr_on_x0() -> None:
    """w·‖v̂ − v‖² = min(SNR, γ)·‖x̂0 − x0‖² (Hang et al. 2023) with SNR = (1 − t)²/t²."""
    flow, t = FlowMatching(), torch.tensor([0.05, 0.3, 0.6, 0.95], dtype=torch.float64)
    snr, gamma = ((1 - t) / t) ** 2, 5.0
    v_err = torch.randn(4, 8, dtype=torch.float64)
    x_t = torch.randn(4, 8, dtype=torch.float64)
    x0_err = flow.x0_at(v_err, x_t, 1 - t[:, None], t[:, None]) - flow.x0_at(0 * v_err, x_t, 1 - t[:, None], t[:, None])
    lhs = flow.min_snr_weight(snr, gamma) * v_err.pow(2).sum(1)
    torch.testing.assert_close(lhs, snr.clamp(max=gamma) * x0_err.pow(2).sum(1))


def test_guided_flow_sampling_with_scale_one_is_the_conditional_model() -> None:
    model = lambda x, t, c: 0.1 * x + c.reshape(-1, 1, 1, 1)
    x_T, cond, uncond = torch.randn(2, 1, 2, 2), torch.tensor([1.0, 2.0]), torch.zeros(2)
    guided = flow_euler_sample(classifier_free_guidance(model, cond, uncond, 1.0), x_T, None, FlowMatching(), 5)
    plain = flow_euler_sample(lambda x, t: model(x, t, cond), x_T, None, FlowMatching(), 5)
    assert torch.equal(guided, plain)
    const = lambda x, t, c: c.reshape(-1, 1, 1, 1).expand_as(x)  # v = w·c guided, so x0 = x_T − w·c (Σ dσ = −1)
    strong = flow_euler_sample(classifier_free_guidance(const, cond, uncond, 3.0), x_T, None, FlowMatching(), 5)
    torch.testing.assert_close(strong, x_T - 3 * const(x_T, None, cond), rtol=1e-6, atol=1e-6)


def test_flow_sampler_refuses_a_diffusion_prediction() -> None:
    from ldmlab.diffusion import EpsPrediction

    with pytest.raises(TypeError, match="set model/diffusion/prediction=flow"):
        flow_euler_sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), None, EpsPrediction(), 2)


# ---------------------------------------------------------------- a tiny flow LDM through Lightning


class Latents(Dataset):
    """16 structured latents (two classes: ± a fixed pattern, plus a little noise): something to learn."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        pattern = torch.randn(4, 4, 4, generator=g)
        self.labels = torch.arange(16) % 2
        sign = (2 * self.labels - 1).float().reshape(-1, 1, 1, 1)
        self.latents = sign * pattern + 0.1 * torch.randn(16, 4, 4, 4, generator=g)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latents[i], "label": int(self.labels[i])}


def test_tiny_flow_ldm_trains_and_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = UNetModel(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), num_heads=4,
                     context_dim=None, num_classes=2)
    diffusion = Diffusion(FlowMatching(density="logit_normal"), sampler=partial(flow_euler_sample, num_steps=4))
    m = LatentDiffusionModule(unet=unet, diffusion=diffusion, conditioner=ClassConditioner(2),
                              latent_scale=1.0, optimizer=partial(torch.optim.AdamW, lr=2e-3))
    batch = next(iter(DataLoader(Latents(), batch_size=16)))

    def loss() -> float:  # the same t and ε each time: a fair before/after
        with torch.no_grad():
            return m.diffusion_loss(batch, torch.Generator().manual_seed(9), p_uncond=0.0).item()

    before = loss()
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_model_summary=False)
    trainer.fit(m, DataLoader(Latents(), batch_size=8, shuffle=True))
    after = loss()
    assert after < 0.7 * before, (before, after)
    x = m.sample([0, 1, 1], 3, guidance_scale=2.0, seed=1, sampler=partial(flow_heun_sample, num_steps=3))
    assert x.shape == (3, 4, 4, 4) and torch.isfinite(x).all()
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_diffusion_training_inputs_are_the_ddpm_recipe(gamma: float | None) -> None:
    """The seam the module calls draws what it drew before flow matching: t, then DDPM eq. 4's noise, same order."""
    from ldmlab.diffusion import VPrediction, noisy_inputs, sample_timesteps, scaled_linear

    schedule, pred, x0 = scaled_linear(), VPrediction(), torch.randn(4, 4, 3, 3)
    x_t, t, target, weight = pred.training_inputs(x0, schedule, torch.Generator().manual_seed(3), 0.1, 0.05, gamma)
    g = torch.Generator().manual_seed(3)
    t_ref = sample_timesteps(4, 1000, g)
    x_ref, target_ref = noisy_inputs(x0, t_ref, schedule, pred, 0.1, 0.05, g)
    snr = schedule.snr(t_ref)
    assert torch.equal(t, t_ref) and torch.equal(x_t, x_ref) and torch.equal(target, target_ref)
    assert torch.equal(weight, torch.ones_like(snr) if gamma is None else pred.min_snr_weight(snr, gamma))
