"""Improved DDPM's learned variance (ldmlab.diffusion.variance) against closed forms: the interpolation's endpoints,
Gaussian KL and NLL, the DDPM posterior, the VLB of a perfect step, L_hybrid's stop-gradient, and the samplers and
guidance reading a [prediction | variance] output."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldmlab.diffusion import (
    EpsPrediction,
    FixedVariance,
    LearnedVariance,
    Prediction,
    VPrediction,
    classifier_free_guidance,
    cosine,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    euler_sample,
    gaussian_nll,
    learned_log_variance,
    normal_kl,
    posterior_mean,
    posterior_variance,
    scaled_linear,
    vlb_terms,
    weighted_mse,
)
from ldmlab.diffusion.variance import split_output
from ldmlab.nn.unet import UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- closed forms


def test_interpolation_endpoints_are_beta_and_beta_tilde() -> None:
    """v = 1 gives log β_t exactly, v = −1 log β̃_t exactly, v = 0 their geometric mean (eq. 15)."""
    ab = cosine().alphas_cumprod
    t = torch.tensor([1, 10, 500, 999])
    a_t, a_prev = ab[t], ab[t - 1]
    log_beta, log_beta_tilde = torch.log(1 - a_t / a_prev), torch.log(posterior_variance(a_t, a_prev))
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.equal(learned_log_variance(ones, log_beta, log_beta_tilde), log_beta)
    assert torch.equal(learned_log_variance(-ones, log_beta, log_beta_tilde), log_beta_tilde)
    mid = learned_log_variance(0 * ones, log_beta, log_beta_tilde).exp()
    torch.testing.assert_close(mid, ((1 - a_t / a_prev) * posterior_variance(a_t, a_prev)).sqrt())
    assert torch.equal(log_beta, torch.log(cosine().betas[t]))  # 1 − ᾱ_t/ᾱ_{t−1} is β_t on the full grid


def test_posterior_is_the_gaussian_bayes_update() -> None:
    """q(x_{t−1} | x_t, x0) ∝ N(x_{t−1}; √ᾱ_{t−1} x0, 1 − ᾱ_{t−1}) · N(x_t; √α_t x_{t−1}, β_t): precision is the
    sum of precisions, mean the precision-weighted mean (DDPM eq. 6–7 derived, not restated)."""
    ab = scaled_linear().alphas_cumprod
    x0, x_t = torch.randn(3, 5, generator=_g(0), dtype=torch.float64), torch.randn(3, 5, generator=_g(1),
                                                                                  dtype=torch.float64)
    for t in (1, 7, 400, 999):
        a_t, a_prev = ab[t].item(), ab[t - 1].item()
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        precision = 1 / (1 - a_prev) + alpha / beta
        mean = (a_prev**0.5 * x0 / (1 - a_prev) + alpha**0.5 * x_t / beta) / precision
        assert posterior_variance(a_t, a_prev) == pytest.approx(1 / precision, rel=1e-12)
        torch.testing.assert_close(posterior_mean(x0, x_t, a_t, a_prev), mean, rtol=1e-12, atol=1e-12)


def test_normal_kl_and_nll_closed_forms() -> None:
    m, lv = torch.randn(50, generator=_g(2)), torch.randn(50, generator=_g(3))
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(50))  # identical Gaussians
    # KL(N(0, 1) ‖ N(1, 4)) = log 2 + (1 + 1)/(2·4) − 1/2
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(math.log(2) + 0.25 - 0.5, rel=1e-6)
    m2, lv2 = torch.randn(50, generator=_g(4)), torch.randn(50, generator=_g(5))
    want = kl_divergence(Normal(m, (0.5 * lv).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), want)
    x = torch.randn(50, generator=_g(6))
    torch.testing.assert_close(gaussian_nll(x, m, lv), -Normal(m, (0.5 * lv).exp()).log_prob(x))


def _step(schedule, t: torch.Tensor, shape=(4, 2, 3, 3)):
    """x0 and x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε at timesteps t."""
    x0, noise = torch.randn(shape, generator=_g(7)), torch.randn(shape, generator=_g(8))
    return x0, schedule.add_noise(x0, noise, t), noise


def test_vlb_of_a_perfect_step_is_zero_and_grows_off_it() -> None:
    """With x̂0 = x0 and v = −1 (Σ_θ = β̃_t, the true variance), every KL term is 0; a wrong mean or a wrong
    variance makes it positive, and it equals the KL of one Gaussian per element, averaged, in bits."""
    schedule, t = scaled_linear(), torch.tensor([1, 50, 500, 999])
    x0, x_t, _ = _step(schedule, t)
    v = -torch.ones_like(x0)
    assert vlb_terms(x0, x_t, t, x0, v, schedule).abs().max() < 1e-6
    off_mean, off_var = vlb_terms(x0, x_t, t, x0 + 0.1, v, schedule), vlb_terms(x0, x_t, t, x0, v + 1, schedule)
    assert (off_mean > 0).all() and (off_var[:3] > 0).all()  # at t = 999 β ≈ β̃: v barely matters
    a_t, a_prev = schedule.alpha_bar(t[1]).item(), schedule.alpha_bar(t[1] - 1).item()
    d_mean = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t) * 0.1  # μ̃ moves by its x0 coefficient × 0.1
    assert off_mean[1].item() == pytest.approx(d_mean**2 / (2 * posterior_variance(a_t, a_prev)) / math.log(2),
                                               rel=1e-4)
    a_t, a_prev = schedule.alpha_bar(1).item(), schedule.alpha_bar(0).item()  # t = 1: a KL far above fp32 noise
    r = (1 - a_t / a_prev) / posterior_variance(a_t, a_prev)  # v = 0: Σ_θ = √(β β̃), log ratio ½ log r
    assert off_var[0].item() == pytest.approx(0.5 * (0.5 * math.log(r) + r**-0.5 - 1) / math.log(2), rel=1e-4)


def test_vlb_at_t0_is_the_decoder_nll() -> None:
    """t = 0: −log N(x0; μ̃(x_0, x̂0), Σ_θ) with log Σ_θ between log β_0 and the clipped log β̃_1."""
    schedule, t = scaled_linear(), torch.zeros(4, dtype=torch.long)
    x0, x_t, _ = _step(schedule, t)
    x0_pred, v = x0 + 0.01, torch.full_like(x0, 0.3)
    ab = schedule.alphas_cumprod
    log_var = learned_log_variance(v, math.log(1 - ab[0].item()), math.log(posterior_variance(ab[1], ab[0]).item()))
    mean = posterior_mean(x0_pred, x_t, ab[0].item(), 1.0)
    assert torch.allclose(mean, x0_pred)  # ᾱ_{−1} = 1: the last step's posterior mean is x̂0 itself
    want = gaussian_nll(x0, mean, log_var).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(vlb_terms(x0, x_t, t, x0_pred, v, schedule), want)


# ---------------------------------------------------------------- L_hybrid


def _hybrid_inputs(prediction: Prediction | None = None):
    prediction = prediction or EpsPrediction()
    schedule, t = scaled_linear(), torch.tensor([0, 3, 400, 999])
    x0, x_t, noise = _step(schedule, t, (4, 2, 4, 4))
    target = prediction.target(x0, noise, t, schedule)
    out = torch.randn(4, 4, 4, 4, generator=_g(9)).requires_grad_()
    return out, target, torch.ones(4), x0, x_t, t, schedule, prediction


@pytest.mark.parametrize("prediction", [EpsPrediction(), VPrediction()])
def test_hybrid_loss_is_simple_plus_lambda_vlb_with_a_stopped_mean(prediction) -> None:
    """loss = L_simple + λ·T·mean_t L_t; the prediction half gets L_simple's gradient alone (stop-gradient), the
    variance half the VLB's alone, scaled by λ."""
    out, target, weight, x0, x_t, t, schedule, pred = _hybrid_inputs(prediction)
    loss, parts = LearnedVariance(0.001).loss(out, target, weight, x0, x_t, t, schedule, pred)
    simple = weighted_mse(out[:, :2], target, weight)
    vlb = 1000 * vlb_terms(x0, x_t, t, pred.to_x0(out[:, :2].detach(), x_t, t, schedule), out[:, 2:], schedule).mean()
    torch.testing.assert_close(parts["loss_simple"], simple.detach())
    torch.testing.assert_close(parts["loss_vlb"], vlb.detach())
    torch.testing.assert_close(loss, simple + 0.001 * vlb)
    grad = torch.autograd.grad(loss, out)[0]
    torch.testing.assert_close(grad[:, :2], torch.autograd.grad(simple, out)[0][:, :2], rtol=0, atol=0)
    grad_big = torch.autograd.grad(LearnedVariance(0.1).loss(out, target, weight, x0, x_t, t, schedule, pred)[0],
                                   out)[0]
    torch.testing.assert_close(grad_big[:, :2], grad[:, :2], rtol=0, atol=0)  # λ never reaches the mean
    assert grad[:, 2:].abs().sum() > 0
    torch.testing.assert_close(grad_big[:, 2:], 100 * grad[:, 2:])  # the variance learns from λ·L_vlb only


def test_variance_head_of_a_unet_learns_from_the_vlb_only() -> None:
    """Through a real U-Net: its output conv's variance rows get no gradient from L_simple, its prediction rows
    none from L_vlb (the loss with λ → 0 and λ = 1 differ only in the variance rows)."""
    unet = UNetModel(in_channels=2, out_channels=4, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                     attention_levels=(), num_heads=2, context_dim=None, norm_groups=8)
    with torch.no_grad():
        unet.out[-1].weight.normal_(0, 0.1, generator=_g(10))  # zero-initialised: make the head say something
    _, target, weight, x0, x_t, t, schedule, pred = _hybrid_inputs()

    def head_grad(variance) -> torch.Tensor:
        unet.zero_grad()
        variance.loss(unet(x_t, t), target, weight, x0, x_t, t, schedule, pred)[0].backward()
        return unet.out[-1].weight.grad.clone()  # (out, in, 3, 3): rows 0–1 the prediction, 2–3 the variance

    g_tiny, g_one = head_grad(LearnedVariance(1e-9)), head_grad(LearnedVariance(1.0))
    assert g_tiny[2:].abs().max() < 1e-9 * g_one[2:].abs().max() * 10  # L_simple: none for the variance rows
    torch.testing.assert_close(g_one[:2], g_tiny[:2])  # L_vlb: none for the prediction rows
    assert g_one[2:].abs().sum() > 0


def test_refusals_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^model.diffusion.variance.vlb_weight=0 must be > 0 .*model/diffusion/variance=fixed$"):
        LearnedVariance(0)
    out, target, weight, x0, x_t, t, _, pred = _hybrid_inputs()
    with pytest.raises(ValueError, match=r"^model/diffusion/variance=learned needs a noise schedule"):
        LearnedVariance().loss(out, target, weight, x0, x_t, t, None, pred)
    assert FixedVariance().channels_problem(4, 4) is None and LearnedVariance().channels_problem(4, 8) is None
    line = LearnedVariance().channels_problem(4, 4)
    assert line is not None and "\n" not in line and line.endswith("set model.unet.out_channels=8")
    with pytest.raises(ValueError, match="outputs 6 channels for 4-channel inputs"):
        split_output(torch.zeros(1, 6, 2, 2), 4)


# ---------------------------------------------------------------- samplers and guidance

W = torch.randn(4, 4, generator=_g(11)) * 0.5


def mean_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    return torch.tanh((W @ x.flatten(2)).view_as(x)) * (1 - tt) + 0.3 * tt * x


def with_v(v: float | None):
    """The network `mean_net` plus a constant variance output v (None: no variance half)."""
    if v is None:
        return mean_net
    return lambda x, t: torch.cat([mean_net(x, t), torch.full_like(x, v)], 1)


def _run(sampler, denoise, **kw) -> torch.Tensor:
    x_T = torch.randn(2, 4, 6, 6, generator=_g(12))
    return sampler(denoise, x_T, scaled_linear(), EpsPrediction(), generator=_g(13), **kw)


@pytest.mark.parametrize("num_steps", [1000, 20])
def test_ddpm_with_v_at_the_ends_is_the_fixed_sampler(num_steps: int) -> None:
    """v ≡ −1 samples with σ² = β̃ and v ≡ 1 with σ² = β of each (strided) jump: the fixed samplers' two choices."""
    for v, fixed in ((-1.0, "beta_tilde"), (1.0, "beta")):
        learned, want = _run(ddpm_sample, with_v(v), num_steps=num_steps), _run(ddpm_sample, mean_net,
                                                                                num_steps=num_steps, variance=fixed)
        # σ as exp(½ log Σ) in fp32 vs √ in fp64: 1e-7 per step, over 1000 steps
        torch.testing.assert_close(learned, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(_run(ddpm_sample, with_v(0.0), num_steps=20), _run(ddpm_sample, mean_net, num_steps=20))


def test_ddim_eta_uses_the_learned_variance_and_eta0_ignores_it() -> None:
    """DDIM's σ_t(η) = η·Σ_θ^½: v ≡ −1 is the fixed η·β̃^½; η = 0 and the ODE samplers never read v."""
    torch.testing.assert_close(_run(ddim_sample, with_v(-1.0), eta=0.7), _run(ddim_sample, mean_net, eta=0.7))
    assert not torch.allclose(_run(ddim_sample, with_v(1.0), eta=0.7), _run(ddim_sample, mean_net, eta=0.7))
    for sampler, kw in ((ddim_sample, {"eta": 0.0}), (dpmpp_2m_sample, {}), (euler_sample, {})):
        assert torch.equal(_run(sampler, with_v(0.5), num_steps=6, **kw), _run(sampler, mean_net, num_steps=6, **kw))


def test_guidance_extrapolates_the_prediction_only() -> None:
    """CFG on a [prediction | v] output: the prediction is guided, v comes from the conditional branch (GLIDE)."""
    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([x * c[:, None, None, None], x + 10 * c[:, None, None, None]], 1)

    x, t = torch.randn(2, 3, 2, 2, generator=_g(14)), torch.zeros(2, dtype=torch.long)
    cond, uncond = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.5])
    out = classifier_free_guidance(model, cond, uncond, 4.0)(x, t)
    out_u, out_c = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out[:, :3], out_u[:, :3] + 4.0 * (out_c[:, :3] - out_u[:, :3]))
    assert torch.equal(out[:, 3:], out_c[:, 3:])
    mean_only = classifier_free_guidance(lambda x, t, c: model(x, t, c)[:, :3], cond, uncond, 4.0)(x, t)
    assert torch.equal(mean_only, out[:, :3])  # a network without a variance half: as before
