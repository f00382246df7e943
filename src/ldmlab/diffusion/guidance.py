"""Sampling-time steering of the denoiser: classifier-free guidance, classifier guidance and Imagen's x̂0
thresholding. Guidance wraps the denoise callable `denoise(x_t, t) -> model output`, so every sampler takes it,
and the two kinds compose: `classifier_guidance(classifier_free_guidance(model, ...), ...)`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldmlab.diffusion.parameterization import Prediction
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.variance import join_output, split_output

__all__ = ["Cond", "classifier_free_guidance", "classifier_gradient", "classifier_guidance", "dynamic_threshold",
           "static_threshold"]

Cond = Tensor | dict[str, Tensor]
Denoise = Callable[[Tensor, Tensor], Tensor]


def _cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings (tensors, or dicts of tensors) along the batch dimension."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    raise TypeError("cond and uncond must both be tensors or both dicts of tensors")


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Cond], Tensor], cond: Cond, uncond: Cond, scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): out_u + w·(out_c − out_u) from one batched
    forward over [uncond; cond]; w = 1 is the conditional model and costs a single unbatched forward. A learned
    variance's half of the output is not guided: it comes from the conditional branch (as GLIDE samples)."""
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both = _cat(uncond, cond)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)  # (2B, …) → 2 × (B, …)
        (mean_u, _), (mean_c, v_c) = split_output(out_u, x.shape[1]), split_output(out_c, x.shape[1])
        return join_output(mean_u + scale * (mean_c - mean_u), v_c)

    return denoise


def classifier_gradient(classifier: Callable[[Tensor, Tensor], Tensor], labels: Tensor) -> Denoise:
    """x_t, t ↦ ∇_x log p(y | x_t, t) of a noise-aware classifier's logits at the labels y (B,), by autograd
    (Dhariwal & Nichol 2021, Algorithm 1's ∇ log p_φ(y | x_t)); at least float32 whatever the sampling dtype."""

    def grad(x: Tensor, t: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled():  # inference tensors cannot be saved for backward
            raise RuntimeError("classifier guidance needs autograd: sample under torch.no_grad(), not "
                               "torch.inference_mode()")
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 sampling: the gradient in float32
        with torch.enable_grad():  # the samplers run under no_grad
            x_in = x.detach().to(dtype).requires_grad_(True)
            log_p = torch.log_softmax(classifier(x_in, t).to(dtype), dim=-1)  # (B, K)
            chosen = log_p.gather(1, labels.to(log_p.device).long()[:, None]).sum()  # Σ_i log p(y_i | x_i): ∇ per row
            return torch.autograd.grad(chosen, x_in)[0].to(x.dtype)

    return grad


def classifier_guidance(
    denoise: Denoise, grad_log_p: Denoise, scale: float, schedule: NoiseSchedule | None, prediction: Prediction
) -> Denoise:
    """Classifier guidance (Dhariwal & Nichol 2021, eq. 14 and Algorithm 2): ε̂' = ε̂ − γ·σ_t·∇_x log p(y | x_t),
    the score of p(x_t)·p(y | x_t)^γ, returned as the model's own output (ε, v, x0 or flow velocity) through
    `prediction`, so any sampler uses it. γ = 0 is the unguided denoiser. Where α_t = 0 (zero-SNR or flow's pure
    noise) ε̂ = x_t is fixed and the step is left unguided. A learned variance's half of the output is not guided."""
    if scale == 0:
        return denoise

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out, variance = split_output(denoise(x, t), x.shape[1])
        return join_output(guided_mean(out, x, t), variance)

    def guided_mean(out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = prediction.noise_level(t, schedule, x)
        eps = prediction.eps_at(out, x, alpha, sigma) - (scale * sigma) * grad_log_p(x, t)
        pinned = alpha == 0
        x0 = (x - sigma * eps) / torch.where(pinned, torch.ones_like(alpha), alpha)  # DDIM eq. 9
        return torch.where(pinned, out, prediction.target_at(x0, eps, alpha, sigma))

    return guided


def static_threshold(x0: Tensor, limit: float = 1.0) -> Tensor:
    """Static thresholding: clip x̂0 to [−limit, limit] (Saharia et al. 2022, "Imagen", sec. 2.3)."""
    return x0.clamp(-limit, limit)


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = float("inf")) -> Tensor:
    """Dynamic thresholding (Imagen, sec. 2.3): s = max(1, ratio-quantile of |x̂0|) per sample; clip to
    [−s, s] and divide by s. `max_value` caps s (diffusers' `sample_max_value`)."""
    flat = x0.reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs fp32/64
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)
