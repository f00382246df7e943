"""Classifier-free guidance training: drop the condition to its null value with probability p (seeded)."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_condition(cond: Tensor, null: Tensor, p_uncond: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each batch row of `cond` by `null` with probability p_uncond (Ho & Salimans 2022, Alg. 1).

    Works for class labels (B,) with a scalar null class and for embeddings (B, L, D) with a (L, D) or
    (1, L, D) empty-prompt embedding; `generator` makes the dropped rows reproducible (DiT's label dropout).
    """
    if p_uncond <= 0:
        return cond
    drop = torch.rand(cond.shape[0], generator=generator, device=generator.device if generator else cond.device)
    mask = (drop.to(cond.device) < p_uncond).reshape(-1, *([1] * (cond.ndim - 1)))  # (B, 1, …)
    return torch.where(mask, null.to(device=cond.device, dtype=cond.dtype), cond)
