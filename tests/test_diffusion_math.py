"""ldmlab.diffusion against closed forms: schedules, parameterisations, weights, samplers, guidance."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldmlab.diffusion import (
    EpsPrediction,
    NoiseSchedule,
    StepInfo,
    VPrediction,
    X0Prediction,
    classifier_free_guidance,
    cosine,
    ddim_sample,
    ddpm_linear,
    ddpm_sample,
    dpmpp_2m_sample,
    dynamic_threshold,
    euler_sample,
    min_snr_weight,
    noisy_inputs,
    sample_noise,
    sample_timesteps,
    scaled_linear,
    spaced_timesteps,
    static_threshold,
    uniform_weight,
    weighted_mse,
)
from ldmlab.diffusion.timesteps import karras_sigmas, sigma_to_t, ve_sigmas

PREDICTIONS = [EpsPrediction(), VPrediction(), X0Prediction()]
SAMPLERS = [ddpm_sample, ddim_sample, dpmpp_2m_sample, euler_sample]
CONSTRUCTORS = [ddpm_linear, scaled_linear, cosine]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def f_cos(t: float, s: float = 0.008) -> float:
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


# ---------------------------------------------------------------- schedules


def test_ddpm_linear_ends():
    ab = ddpm_linear().alphas_cumprod
    assert ab[0].item() == pytest.approx(1 - 1e-4, rel=1e-15)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert ab[-1].item() == pytest.approx(math.exp(math.fsum(math.log1p(-b) for b in betas)), rel=1e-12)
    assert ab[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)  # DDPM's ᾱ_T


def test_scaled_linear_ends():
    ab = scaled_linear().alphas_cumprod
    assert ab[0].item() == pytest.approx(1 - 0.00085, rel=1e-15)
    assert ab[-1].item() ** 0.5 == pytest.approx(0.068265, abs=1e-6)  # SD's √ᾱ_T (Lin et al. 2024, sec. 3.1)


def test_cosine_ends():
    ab = cosine().alphas_cumprod
    assert ab[0].item() == pytest.approx(f_cos(1 / 1000) / f_cos(0), rel=1e-14)
    assert ab[-2].item() == pytest.approx(f_cos(999 / 1000) / f_cos(0), rel=1e-10)
    assert ab[-1].item() == pytest.approx(ab[-2].item() * (1 - 0.999), rel=1e-14)  # last β clipped at 0.999
    assert cosine().betas.max().item() == 0.999


@pytest.mark.parametrize("make", CONSTRUCTORS)
@pytest.mark.parametrize("num_timesteps", [1000, 37])
def test_zero_terminal_snr(make, num_timesteps):
    plain, zero = make(num_timesteps=num_timesteps), make(num_timesteps=num_timesteps, zero_terminal_snr=True)
    assert zero.alphas_cumprod.dtype == torch.float64 and zero.num_timesteps == num_timesteps
    assert zero.alphas_cumprod[-1].item() == 0.0 and zero.snr(num_timesteps - 1).item() == 0.0
    assert zero.alphas_cumprod[0].item() == pytest.approx(
        plain.alphas_cumprod[0].item(), rel=1e-12
    )  # √ᾱ_0 kept
    assert bool((zero.alphas_cumprod.diff() < 0).all()) and zero.betas[-1].item() == 1.0
    sqrt_ab, sqrt_plain = zero.alphas_cumprod.sqrt(), plain.alphas_cumprod.sqrt()  # Alg. 1: affine in √ᾱ
    ref = (sqrt_plain - sqrt_plain[-1]) * sqrt_plain[0] / (sqrt_plain[0] - sqrt_plain[-1])
    torch.testing.assert_close(sqrt_ab, ref, rtol=1e-10, atol=1e-12)


def test_schedule_helpers_and_dtypes():
    s = scaled_linear(num_timesteps=50)
    t = torch.tensor([0, 49])
    torch.testing.assert_close(s.snr(t), s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t]))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x0, noise = torch.ones(2, 3, 4, 4, dtype=dtype), torch.zeros(2, 3, 4, 4)
        x_t = s.add_noise(x0, noise, t)
        assert x_t.dtype == dtype
        torch.testing.assert_close(x_t[:, 0, 0, 0].double(), s.alphas_cumprod[t].sqrt(), rtol=1e-2, atol=0)
    with pytest.raises(ValueError):
        NoiseSchedule(betas=torch.tensor([0.1, 1.5]))


# ---------------------------------------------------------------- parameterisation


@settings(max_examples=60, deadline=None)
@given(alpha_bar=st.floats(1e-6, 1 - 1e-6), seed=st.integers(0, 2**31 - 1))
def test_eps_v_x0_round_trips(alpha_bar, seed):
    g = torch.Generator().manual_seed(seed)
    x0, eps = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    a, s = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    x_t = a * x0 + s * eps
    v = VPrediction().target_at(x0, eps, a, s)
    torch.testing.assert_close(v, a * eps - s * x0)  # v = √ᾱ ε − √(1−ᾱ) x0
    for pred in PREDICTIONS:
        out = pred.target_at(x0, eps, a, s)
        tol = {"rtol": 1e-9, "atol": 1e-9 / min(a, s)}  # x0 ↔ ε divide by √ᾱ or √(1−ᾱ)
        torch.testing.assert_close(pred.x0_at(out, x_t, a, s), x0, **tol)
        torch.testing.assert_close(pred.eps_at(out, x_t, a, s), eps, **tol)
        # any parameterisation's output converts to any other's target: ε → v → x0 → ε …
        for other in PREDICTIONS:
            converted = other.target_at(pred.x0_at(out, x_t, a, s), pred.eps_at(out, x_t, a, s), a, s)
            torch.testing.assert_close(converted, other.target_at(x0, eps, a, s), **tol)


@pytest.mark.parametrize("pred", PREDICTIONS, ids=lambda p: p.name)
def test_timestep_api_matches_scalings(pred):
    schedule, g = cosine(num_timesteps=100), torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    x_t, target = schedule.add_noise(x0, eps, t), pred.target(x0, eps, t, schedule)
    torch.testing.assert_close(pred.to_x0(target, x_t, t, schedule), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.to_eps(target, x_t, t, schedule), eps, rtol=1e-4, atol=1e-4)
    assert target.dtype == torch.float32 and {p.name for p in PREDICTIONS} == {"eps", "v", "x0"}


# ---------------------------------------------------------------- loss weights and noise


def test_min_snr_weights_at_known_snr():
    snr = torch.tensor([0.0, 0.5, 1.0, 5.0, 10.0, 100.0], dtype=torch.float64)
    expected = {
        "eps": [1.0, 1.0, 1.0, 1.0, 0.5, 0.05],  # min(SNR, 5)/SNR, limit 1 at SNR = 0
        "v": [0.0, 0.5 / 1.5, 0.5, 5 / 6, 5 / 11, 5 / 101],  # min(SNR, 5)/(SNR + 1)
        "x0": [0.0, 0.5, 1.0, 5.0, 5.0, 5.0],  # min(SNR, 5)
    }
    for pred in PREDICTIONS:
        w = min_snr_weight(snr, pred, gamma=5.0)
        torch.testing.assert_close(w, torch.tensor(expected[pred.name], dtype=torch.float64))
        torch.testing.assert_close(uniform_weight(snr, pred), torch.ones_like(snr))


def test_weights_finite_with_zero_terminal_snr():
    schedule = scaled_linear(zero_terminal_snr=True)
    t = torch.arange(1000)
    for pred in PREDICTIONS:
        w = min_snr_weight(schedule.snr(t), pred)
        assert torch.isfinite(w).all() and (w >= 0).all()


def test_offset_noise_and_input_perturbation():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise(x0, 1.0, torch.Generator().manual_seed(0))
    # per-(sample, channel) spatial means: std ≈ 1/16 without offset, ≈ √(1 + 1/256) with offset 1
    assert plain.mean(dim=(2, 3)).std() < 0.15 and offset.mean(dim=(2, 3)).std() > 0.7
    schedule, pred, t = scaled_linear(), VPrediction(), torch.full((64,), 500)
    x_ref, tgt_ref = noisy_inputs(x0, t, schedule, pred, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        x_ref, schedule.add_noise(x0, sample_noise(x0, 0.0, torch.Generator().manual_seed(1)), t)
    )
    x_ip, tgt_ip = noisy_inputs(
        x0, t, schedule, pred, input_perturbation=0.1, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(tgt_ip, tgt_ref)  # the target keeps ε …
    assert not torch.allclose(x_ip, x_ref)  # … x_t is built from ε + γξ
    ratio = ((x_ip - x_ref) / (1 - schedule.alphas_cumprod[500].item()) ** 0.5).std().item()
    assert ratio == pytest.approx(0.1, rel=0.05)


def test_weighted_mse():
    out, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert weighted_mse(out, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 0.5 * 4) / 2)


# ---------------------------------------------------------------- timesteps


def test_timestep_sampling_and_spacing():
    t = sample_timesteps(10_000, 50, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 49 and abs(t.float().mean() - 24.5) < 0.5
    assert spaced_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert spaced_timesteps(1000, 10, "trailing", steps_offset=1).tolist() == list(range(999, 0, -100))
    assert spaced_timesteps(1000, 4, "linspace", steps_offset=1).tolist() == [999, 666, 333, 0]
    assert spaced_timesteps(1000, 4, "linspace", skip_zero=True).tolist() == [999, 749, 500, 250]
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError):
        spaced_timesteps(10, 11)
    with pytest.raises(ValueError):  # leading + offset 1 at n = T would reach t = T (diffusers #10003)
        spaced_timesteps(1000, 1000, "leading", steps_offset=1)


def test_karras_sigmas_and_sigma_to_t():
    sig = karras_sigmas(0.1, 10.0, 5)
    assert sig[0].item() == pytest.approx(10.0) and sig[-1].item() == pytest.approx(0.1)
    assert torch.allclose(
        sig ** (1 / 7), torch.linspace(10 ** (1 / 7), 0.1 ** (1 / 7), 5, dtype=torch.float64)
    )
    table = ve_sigmas(scaled_linear())
    t = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(table[t.long()], table), t)


# ---------------------------------------------------------------- samplers


def oracle(x0: torch.Tensor, schedule: NoiseSchedule, pred, implied_eps: list[torch.Tensor]):
    """The exact denoiser of a single data point x0 (x̂0 = x0 at every (x_t, t)); records the ε each x_t implies."""
    table = ve_sigmas(schedule)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # ᾱ at a possibly fractional t (Euler's grid), through the linearly interpolated VE σ as Euler uses it
        t0 = float(t[0])
        low = min(int(t0), len(table) - 2)
        sigma = (1 - (t0 - low)) * table[low].item() + (t0 - low) * table[low + 1].item()
        a, s = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        implied_eps.append((x_t - a * x0) / s)
        return pred.target_at(x0, implied_eps[-1], a, s)

    return denoise


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("pred", PREDICTIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_oracle_denoiser_returns_x0(sampler, pred, spacing):
    schedule, g = scaled_linear(), torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    implied: list[torch.Tensor] = []
    out = sampler(oracle(x0, schedule, pred, implied), x_T, schedule, pred, 15, spacing=spacing, generator=g)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    if sampler is not ddpm_sample:  # ODE solvers stay on the exact path x_t = √ᾱ x0 + √(1−ᾱ) ε*: ε* constant
        assert len(implied) == 15
        tol = 1e-6 if sampler is euler_sample else 1e-9  # Euler hands the model a float32 (fractional) t
        for eps in implied[1:]:
            torch.testing.assert_close(eps, implied[0], rtol=tol, atol=tol)


def test_ddim_eta_one_is_ddpm():
    """DDIM with η = 1 is DDPM's ancestral sampler with σ² = β̃ (Song et al. 2021, sec. 4.1)."""
    schedule, pred = cosine(), EpsPrediction()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = lambda x, t: torch.tanh(x) * (t.double()[:, None, None, None] / 1000)
    for spacing in ("linspace", "trailing"):
        a = ddim_sample(
            denoise,
            x_T,
            schedule,
            pred,
            25,
            eta=1.0,
            spacing=spacing,
            generator=torch.Generator().manual_seed(3),
        )
        b = ddpm_sample(
            denoise, x_T, schedule, pred, 25, spacing=spacing, generator=torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
def test_callback_generator_and_noise_fn(sampler):
    schedule, pred = scaled_linear(), EpsPrediction()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    denoise = lambda x, t: 0.5 * x
    seen: list[StepInfo] = []
    kw = {"eta": 1.0} if sampler is ddim_sample else {}
    out = sampler(
        denoise,
        x_T,
        schedule,
        pred,
        7,
        callback=seen.append,
        generator=torch.Generator().manual_seed(1),
        **kw,
    )
    assert [s.i for s in seen] == list(range(7)) and {s.num_steps for s in seen} == {7}
    assert torch.equal(seen[-1].x, out) and out.dtype == x_T.dtype and out.shape == x_T.shape
    again = sampler(denoise, x_T, schedule, pred, 7, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out, again)
    calls: list[int] = []
    noise_fn = lambda x: (calls.append(1), torch.zeros_like(x))[1]
    quiet = sampler(denoise, x_T, schedule, pred, 7, noise_fn=noise_fn, **kw)
    if sampler in (ddpm_sample, ddim_sample):  # stochastic: one draw per step but the last (σ = 0 there)
        assert len(calls) == 6 and not torch.allclose(quiet, out)
    else:  # deterministic ODE solvers never draw
        assert calls == [] and torch.equal(quiet, out)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("pred", [VPrediction(), X0Prediction()], ids=lambda p: p.name)
def test_samplers_finite_with_zero_terminal_snr(sampler, pred):
    schedule = scaled_linear(zero_terminal_snr=True)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    first_t: list[float] = []
    denoise = lambda x, t: (first_t.append(float(t[0])), torch.tanh(x))[1]
    out = sampler(
        denoise, x_T, schedule, pred, 10, spacing="trailing", generator=torch.Generator().manual_seed(1)
    )
    assert torch.isfinite(out).all() and first_t[0] == 999  # trailing starts at the zero-SNR step


# ---------------------------------------------------------------- guidance and thresholding


class CountingModel:
    """model(x, t, cond) = x·cond + t, counting forward calls and batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return x * cond[:, :, None, None] + t[:, None, None, None]


def test_guidance_scale_one_is_conditional_with_one_forward():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5.0, 6.0, 7.0])
    cond, uncond = torch.rand(3, 2) + 1, torch.zeros(3, 2)
    out = classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
    torch.testing.assert_close(out, x * cond[:, :, None, None] + t[:, None, None, None])
    assert model.batches == [3]


def test_guidance_scale_w_is_one_batched_forward():
    model, x, t = CountingModel(), torch.randn(3, 2, 4, 4), torch.tensor([5.0, 6.0, 7.0])
    cond, uncond = torch.rand(3, 2) + 1, torch.rand(3, 2)
    out = classifier_free_guidance(model, cond, uncond, 7.5)(x, t)
    out_c, out_u = (x * c[:, :, None, None] + t[:, None, None, None] for c in (cond, uncond))
    torch.testing.assert_close(out, out_u + 7.5 * (out_c - out_u))
    assert model.batches == [6]
    dict_model = lambda x, t, c: model(x, t, c["y"])
    out_d = classifier_free_guidance(dict_model, {"y": cond}, {"y": uncond}, 7.5)(x, t)
    torch.testing.assert_close(out_d, out)


def test_thresholding():
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [3.0, -2.0, 0.5, 1.0]])
    torch.testing.assert_close(static_threshold(x0), x0.clamp(-1, 1))
    out = dynamic_threshold(x0, ratio=1.0)  # s = max|x0| per sample, at least 1
    torch.testing.assert_close(out, torch.stack([x0[0], x0[1] / 3.0]))
    assert torch.equal(dynamic_threshold(x0, ratio=1.0, max_value=1.0), static_threshold(x0))
    assert dynamic_threshold(x0.half(), ratio=0.9).dtype == torch.float16


# ---------------------------------------------------------------- layering


def test_diffusion_imports_torch_numpy_and_stdlib_only():
    allowed = {
        "torch",
        "numpy",
        "abc",
        "math",
        "collections",
        "dataclasses",
        "typing",
        "__future__",
        "ldmlab",
    }
    src = Path(__file__).parents[1] / "src" / "ldmlab" / "diffusion"
    files = sorted(src.glob("*.py"))
    assert len(files) >= 7
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
