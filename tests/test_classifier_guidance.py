"""Classifier guidance (Dhariwal & Nichol 2021, eq. 14 / Algorithm 2) as a wrapper of the denoise callable:
scale 0 is the unguided sampler bit for bit; the gradient is autograd's (finite differences, a closed-form
classifier); on a point-mass mixture, where every term is known in closed form, guided ε is Bayes' conditional
ε; it composes with CFG, converts through v / x0 / flow predictions, and refuses inference_mode in one line."""

from __future__ import annotations

import pytest
import torch

from ldmlab.diffusion import (
    EpsPrediction,
    FlowMatching,
    VPrediction,
    X0Prediction,
    classifier_free_guidance,
    classifier_gradient,
    classifier_guidance,
    ddim_sample,
    ddpm_sample,
    euler_sample,
    flow_euler_sample,
    scaled_linear,
)
from ldmlab.nn.noisy_classifier import NoisyClassifier

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = scaled_linear()
MUS = torch.tensor([[1.0, -0.5, 0.25, 0.0, 0.5, -1.0, 0.75, 0.2], [-1.0, 0.5, 0.0, 0.6, -0.4, 1.0, -0.3, 0.1],
                    [0.2, 0.2, -1.2, 0.4, 0.0, 0.3, 0.9, -0.6]], dtype=torch.float64).view(3, 2, 2, 2)


def tiny_classifier(dtype: torch.dtype = torch.float32, seed: int = 0) -> NoisyClassifier:
    torch.manual_seed(seed)
    net = NoisyClassifier(4, in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_levels=(1,), num_heads=None, head_dim=4, norm_groups=4,
                          resnet_time_scale_shift="scale_shift", resblock_updown=True)
    with torch.no_grad():  # away from LDM's zero init, so every layer shapes the gradient
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.to(dtype).eval()


def mixture_log_lik(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log q(x_t | x0 = μ_k) + const per class k, (B, K): the exact noisy classifier of a point-mass mixture with
    equal weights (its log-softmax is log p(k | x_t))."""
    alpha, sigma = SCHEDULE.scalings(t, x)
    d = x[:, None] - alpha[:, None] * MUS.to(x)[None]  # (B, K, C, H, W)
    return -d.flatten(2).square().sum(-1) / (2 * sigma.flatten() ** 2)[:, None]


def mixture_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact ε̂(x_t) of the mixture: x̂0 = Σ_k p(k | x_t) μ_k, ε̂ = (x_t − α x̂0) / σ."""
    alpha, sigma = SCHEDULE.scalings(t, x)
    w = torch.softmax(mixture_log_lik(x, t), dim=-1)  # (B, K)
    x0 = torch.einsum("bk,kchw->bchw", w, MUS.to(x))
    return (x - alpha * x0) / sigma


def test_scale_zero_is_the_unguided_sampler_bit_for_bit() -> None:
    """γ = 0 returns the denoiser itself; a classifier with zero gradient at γ = 5 leaves an ε model's samples
    bit-identical too (ε̂ − γσ·0 is ε̂ exactly)."""
    x_T = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = classifier_gradient(tiny_classifier(torch.float64), torch.tensor([0, 1, 3]))
    for sampler, steps in ((ddim_sample, 8), (ddpm_sample, 8), (euler_sample, 6)):
        for prediction in (EpsPrediction(), VPrediction()):
            plain = sampler(mixture_eps, x_T, SCHEDULE, prediction, steps, generator=torch.Generator().manual_seed(1))
            guided = sampler(classifier_guidance(mixture_eps, grad, 0.0, SCHEDULE, prediction), x_T, SCHEDULE,
                             prediction, steps, generator=torch.Generator().manual_seed(1))
            assert torch.equal(plain, guided), (sampler.__name__, prediction)
    flat = classifier_gradient(lambda x, t: torch.zeros(len(x), 3, dtype=x.dtype) + 0 * x.sum(), torch.tensor([0, 1, 2]))
    plain = ddim_sample(mixture_eps, x_T, SCHEDULE, EpsPrediction(), 8)
    assert torch.equal(plain, ddim_sample(classifier_guidance(mixture_eps, flat, 5.0, SCHEDULE, EpsPrediction()),
                                          x_T, SCHEDULE, EpsPrediction(), 8))


def test_gradient_matches_finite_differences_on_a_tiny_classifier() -> None:
    """∇_x log p(y | x_t) by autograd = central differences of log_softmax(logits)[y], in float64."""
    net = tiny_classifier(torch.float64)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([40, 700]), torch.tensor([2, 0])
    grad = classifier_gradient(net, y)(x, t)

    def log_p(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(net(z, t), -1).gather(1, y[:, None]).sum()

    h, g = 1e-6, torch.Generator().manual_seed(4)
    assert grad.abs().max() > 1e-3  # a gradient that is there
    for _ in range(4):
        v = torch.randn(x.shape, dtype=torch.float64, generator=g)
        numeric = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)
        assert torch.allclose((grad * v).sum(), numeric, rtol=1e-6, atol=1e-8)


def test_gradient_of_a_closed_form_classifier() -> None:
    """logits_k = −‖x − μ_k‖²/2 ⇒ ∇_x log p(y | x) = μ_y − Σ_k p_k μ_k (the normaliser's gradient included)."""
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 2, 1, 2])
    logits = lambda z, t: -(z[:, None] - MUS[None]).flatten(2).square().sum(-1) / 2
    p = torch.softmax(logits(x, None), -1)
    expected = MUS[y] - torch.einsum("bk,kchw->bchw", p, MUS)
    torch.testing.assert_close(classifier_gradient(logits, y)(x, torch.zeros(4)), expected, rtol=1e-12, atol=1e-12)


def test_guided_eps_is_eps_minus_gamma_sigma_grad_for_every_parameterisation() -> None:
    """With log p(y | x) = −‖x − μ_y‖²/2 (∇ = μ_y − x): an ε model's output is ε̂ − γσ_t∇ exactly; v and x0
    models return the output whose ε is that, and whose x̂0 is (x_t − σ ε̂')/α (DDIM eq. 9)."""
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y, gamma = torch.tensor([1, 0, 2]), 2.5
    grad_fn = lambda z, t: MUS[y] - z
    for t in (torch.tensor([10, 10, 10]), torch.tensor([500, 620, 990])):
        alpha, sigma = SCHEDULE.scalings(t, x)
        eps = mixture_eps(x, t)
        want = eps - (gamma * sigma) * (MUS[y] - x)
        assert torch.equal(classifier_guidance(mixture_eps, grad_fn, gamma, SCHEDULE, EpsPrediction())(x, t), want)
        for prediction in (VPrediction(), X0Prediction()):
            model = lambda z, s, p=prediction, a=alpha, sg=sigma: p.target_at((z - sg * mixture_eps(z, s)) / a,
                                                                            mixture_eps(z, s), a, sg)
            out = classifier_guidance(model, grad_fn, gamma, SCHEDULE, prediction)(x, t)
            torch.testing.assert_close(prediction.eps_at(out, x, alpha, sigma), want, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(prediction.x0_at(out, x, alpha, sigma), (x - sigma * want) / alpha,
                                       rtol=1e-10, atol=1e-10)


def test_a_learned_variance_half_is_passed_through_unguided() -> None:
    """model/diffusion/variance=learned: the denoiser returns [ε̂ | v] (2C channels); the ε half is guided as a C-channel
    model's would be, the interpolation v is the model's own (as classifier-free guidance leaves it)."""
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y, t, gamma = torch.tensor([1, 0, 2]), torch.tensor([300, 500, 900]), 1.5
    grad_fn = lambda z, s: MUS[y] - z
    v = torch.rand(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with_variance = lambda z, s: torch.cat([mixture_eps(z, s), v], dim=1)  # (B, 2C)
    out = classifier_guidance(with_variance, grad_fn, gamma, SCHEDULE, EpsPrediction())(x, t)
    alone = classifier_guidance(mixture_eps, grad_fn, gamma, SCHEDULE, EpsPrediction())(x, t)
    assert out.shape == (3, 4, 2, 2) and torch.equal(out[:, :2], alone) and torch.equal(out[:, 2:], v)


def test_guidance_at_scale_one_is_bayes_conditional_on_a_point_mass_mixture() -> None:
    """∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t): with the exact unconditional ε̂ and the exact noisy
    classifier, γ = 1 gives the class's own ε = (x_t − α μ_y)/σ, and DDIM from noise lands on μ_y."""
    y = torch.tensor([0, 1, 2, 1])
    guided = classifier_guidance(mixture_eps, classifier_gradient(mixture_log_lik, y), 1.0, SCHEDULE, EpsPrediction())
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for t in (torch.tensor([5, 5, 5, 5]), torch.tensor([300, 450, 800, 999])):
        alpha, sigma = SCHEDULE.scalings(t, x)
        torch.testing.assert_close(guided(x, t), (x - alpha * MUS[y]) / sigma, rtol=1e-9, atol=1e-9)
    x0 = ddim_sample(guided, x, SCHEDULE, EpsPrediction(), 50)
    torch.testing.assert_close(x0, MUS[y], rtol=0, atol=1e-6)
    unguided = ddim_sample(mixture_eps, x, SCHEDULE, EpsPrediction(), 50)
    assert not torch.allclose(unguided, MUS[y], atol=1e-2)  # the unconditional model lands on other classes


def test_composes_with_classifier_free_guidance() -> None:
    """classifier_guidance(CFG denoiser) = CFG output − γσ∇ (ε model): the two kinds stack."""
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    t, y = torch.tensor([250, 250]), torch.tensor([0, 2])
    model = lambda z, s, c: mixture_eps(z, s) * (1 + 0.1 * c[:, None, None, None])
    cfg = classifier_free_guidance(model, torch.ones(2), torch.zeros(2), 3.0)
    grad = classifier_gradient(mixture_log_lik, y)
    _, sigma = SCHEDULE.scalings(t, x)
    assert torch.equal(classifier_guidance(cfg, grad, 2.0, SCHEDULE, EpsPrediction())(x, t),
                       cfg(x, t) - (2.0 * sigma) * grad(x, t))


def test_fractional_and_flow_times_give_their_noise_levels() -> None:
    """Euler's float timesteps read the interpolated σ (an integral float t equals the integer lookup); the flow
    objective's time s·T has (α, σ) = (1 − s, s), and at s = 1 (α = 0: ε̂ = x_t is pinned) the step is unguided."""
    like = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    for a, b in zip(EpsPrediction().noise_level(torch.tensor([7.0, 900.0]), SCHEDULE, like),
                    EpsPrediction().noise_level(torch.tensor([7, 900]), SCHEDULE, like)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    flow = FlowMatching()
    alpha, sigma = flow.noise_level(torch.tensor([250.0, 1000.0]), None, like)
    assert alpha.flatten().tolist() == [0.75, 0.0] and sigma.flatten().tolist() == [0.25, 1.0]
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    velocity = lambda z, s: z - MUS[:2]
    grad_fn = lambda z, s: MUS[:2] - z
    out = classifier_guidance(velocity, grad_fn, 3.0, None, flow)(x, torch.tensor([250.0, 1000.0]))
    assert torch.equal(out[1], velocity(x, None)[1])  # α = 0: unchanged
    a, s = alpha[:1], sigma[:1]
    want = flow.eps_at(velocity(x, None)[:1], x[:1], a, s) - 3.0 * s * grad_fn(x, None)[:1]
    torch.testing.assert_close(flow.eps_at(out[:1], x[:1], a, s), want, rtol=1e-10, atol=1e-10)
    x_T = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    guided = flow_euler_sample(classifier_guidance(velocity, grad_fn, 3.0, None, flow), x_T, None, flow, 6)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, flow_euler_sample(velocity, x_T, None, flow, 6))


def test_inference_mode_is_refused_in_one_line() -> None:
    grad = classifier_gradient(tiny_classifier(), torch.tensor([0]))
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"^classifier guidance needs autograd: sample "
                                                                    r"under torch.no_grad\(\), not") as info:
        grad(torch.randn(1, 2, 4, 4), torch.tensor([3]))
    assert "\n" not in str(info.value)
    with torch.no_grad():  # the samplers' own mode works, and no parameter gradient is left behind
        net = tiny_classifier()
        assert classifier_gradient(net, torch.tensor([1]))(torch.randn(1, 2, 4, 4), torch.tensor([3])).shape == (1, 2, 4, 4)
    assert all(p.grad is None for p in net.parameters())
