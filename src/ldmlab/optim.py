"""Learning-rate schedules as LambdaLR factories (torch only), selected by `conf/lr_scheduler`."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up over `warmup_steps`, then constant (total_steps=None) or cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    # SGDR (Loshchilov & Hutter 2017) half-cosine from 1 to min_lr_ratio
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Per-step LambdaLR: warm-up then constant or cosine decay (stepped once per training iteration)."""
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps={warmup_steps} must be >= 0")
    if total_steps is not None and total_steps < 0:
        raise ValueError(f"lr_scheduler.total_steps={total_steps} must be >= 0 (or null for constant after warm-up)")
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio))
