"""Sampling-time steering of the denoiser: classifier-free guidance and Imagen's x̂0 thresholding."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldmlab.diffusion.variance import join_output, split_output

__all__ = ["Cond", "classifier_free_guidance", "dynamic_threshold", "static_threshold"]

Cond = Tensor | dict[str, Tensor]


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
