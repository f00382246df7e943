"""Timesteps: uniform sampling for training; spacings and σ grids for inference (diffusers' conventions).

Spacings of n inference steps out of T training steps (Lin et al. 2024; diffusers' `timestep_spacing`):
  "linspace"  round(linspace(0, T−1, n)), descending — starts at T−1, ends at 0.
  "leading"   (T // n)·[n−1, …, 0] + steps_offset — ends at 0 (+offset), starts below T−1 (SD: offset 1).
  "trailing"  round(arange(T, 0, −T/n)) − 1 — starts at T−1; the one to use with zero terminal SNR.
`steps_offset` shifts "leading" only, as in diffusers (its other spacings ignore it).
"""

from __future__ import annotations

from typing import Literal

import numpy as np  # diffusers builds its grids in NumPy; torch.linspace/arange round differently
import torch
from torch import Tensor

from ldmlab.diffusion.schedules import NoiseSchedule

__all__ = [
    "Spacing",
    "interp_sigmas",
    "karras_sigmas",
    "sample_timesteps",
    "sigma_to_t",
    "spaced_timesteps",
    "ve_sigmas",
]

Spacing = Literal["linspace", "leading", "trailing"]

# diffusers' stand-in for ᾱ = 0 in its σ-based (Euler, DPM-Solver) schedulers, so that σ = √((1−ᾱ)/ᾱ) is finite.
ZERO_SNR_ALPHA_BAR = 2.0**-24


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Training timesteps t ~ U{0, …, T−1} (DDPM Algorithm 1), int64 of shape (B,)."""
    return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)


def spaced_timesteps(
    num_train: int,
    num_steps: int,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    skip_zero: bool = False,
    fractional: bool = False,
) -> Tensor:
    """Descending inference timesteps with diffusers' "linspace" / "leading" / "trailing" spacing.

    skip_zero: DPM-Solver's grid — space n+1 points and drop the last (t = 0), whose step is replaced by a
    final jump to σ = 0 (linspace and leading only, as in diffusers). fractional: keep linspace unrounded
    (Euler's grid; σ is then interpolated). Returns int64, or float64 when fractional.
    """
    if not 0 < num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    n = num_steps + 1 if skip_zero and spacing != "trailing" else num_steps
    ts: np.ndarray
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n)[::-1]
        ts = ts if fractional else ts.round()
    elif spacing == "leading":
        ts = np.arange(n)[::-1] * (num_train // n) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / n)) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'")
    ts = ts[:num_steps].copy()  # drops the trailing t = 0 when skip_zero
    if ts.max() > num_train - 1 or ts.min() < 0:
        raise ValueError(f"{spacing} spacing with steps_offset={steps_offset} leaves [0, {num_train - 1}]")
    return torch.from_numpy(ts).to(torch.float64 if fractional else torch.int64)


def ve_sigmas(schedule: NoiseSchedule) -> Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t), the variance-exploding noise level of x_t/√ᾱ_t (Karras et al. 2022, sec. 2),
    float64; ᾱ = 0 (zero terminal SNR) is replaced by 2⁻²⁴ as diffusers does."""
    alpha_bar = schedule.alphas_cumprod.clamp(min=0.0)
    alpha_bar = torch.where(alpha_bar == 0, torch.full_like(alpha_bar, ZERO_SNR_ALPHA_BAR), alpha_bar)
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def interp_sigmas(sigmas: Tensor, t: Tensor) -> Tensor:
    """σ at fractional timesteps by linear interpolation of the σ table (diffusers' Euler, `np.interp`)."""
    t = t.to(torch.float64).clamp(0, sigmas.numel() - 1)
    low = t.floor().long().clamp(max=sigmas.numel() - 2)
    w = t - low
    return (1 - w) * sigmas[low] + w * sigmas[low + 1]


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, eq. 5), float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)) ** rho


def sigma_to_t(sigma: Tensor, sigmas: Tensor) -> Tensor:
    """Fractional timestep of a noise level: linear interpolation in log σ over the table (diffusers/k-diffusion)."""
    log_sigma, log_table = sigma.to(torch.float64).clamp(min=1e-10).log(), sigmas.log()
    low = (log_sigma[None, :] >= log_table[:, None]).sum(0).sub(1).clamp(0, sigmas.numel() - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return low + w
