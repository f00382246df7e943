"""Discrete noise schedules β_t / ᾱ_t (DDPM, LDM/SD, improved DDPM, zero terminal SNR), computed in float64.

Timesteps are 0-based: t = 0 … T−1, and ᾱ_t = Π_{s≤t} (1 − β_s), so ᾱ_0 = 1 − β_0 (diffusers' convention).

Naming: two different schedules are called "linear" across codebases. DDPM's is β linear from 1e-4 to 0.02
(`ddpm_linear` here); LDM/SD's "linear" is linear in √β from 0.00085 to 0.012 (`scaled_linear` here, as in
diffusers). Neither is exported under the bare name "linear", so a config can never pick the wrong one silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NoiseSchedule", "cosine", "ddpm_linear", "rescale_zero_terminal_snr", "scaled_linear"]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Variance-preserving schedule x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM, Ho et al. 2020, eq. 4)."""

    betas: Tensor
    name: str = "custom"
    alphas_cumprod: Tensor = field(init=False, repr=False)
    _tables: dict[torch.device, Tensor] = field(init=False, repr=False, default_factory=dict)  # ᾱ per device

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))  # DDPM eq. 4: ᾱ_t

    @property
    def num_timesteps(self) -> int:
        """Number of training timesteps T."""
        return self.betas.numel()

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """ᾱ_t in float64 at integer timesteps t (any shape), looked up on t's device."""
        t = torch.as_tensor(t, dtype=torch.long)
        if t.device not in self._tables:  # copied once: a copy per call is a blocking host→GPU transfer, which
            self._tables[t.device] = self.alphas_cumprod.to(t.device)  # stalled every training step 3 times
        return self._tables[t.device][t]

    def snr(self, t: Tensor | int) -> Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021, "Variational Diffusion Models"), float64."""
        alpha_bar = self.alpha_bar(t)
        return alpha_bar / (1.0 - alpha_bar)

    def scalings(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) per batch element, shaped (B, 1, …) to broadcast against `like`, in its dtype."""
        alpha_bar = self.alpha_bar(t.to(like.device)).reshape(-1, *([1] * (like.ndim - 1)))
        return alpha_bar.sqrt().to(like.dtype), (1.0 - alpha_bar).sqrt().to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x0): √ᾱ_t x0 + √(1−ᾱ_t) ε (DDPM eq. 4), in the dtype of x0."""
        alpha, sigma = self.scalings(t, x0)
        return alpha * x0 + sigma * noise.to(x0.dtype)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale β so that ᾱ_{T−1} = 0 while √ᾱ_0 is kept (Lin et al. 2024, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", Algorithm 1), in float64."""
    sqrt_ab = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (
        first / (first - last)
    )  # shift so the last is 0, scale so the first is kept
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # ᾱ_t / ᾱ_{t−1}
    return 1.0 - alphas


def _build(betas: Tensor, name: str, zero_terminal_snr: bool) -> NoiseSchedule:
    """Wrap float64 betas in a NoiseSchedule, optionally rescaled to zero terminal SNR."""
    if zero_terminal_snr:
        betas, name = rescale_zero_terminal_snr(betas), f"{name}+zero_snr"
    return NoiseSchedule(betas=betas, name=name)


def ddpm_linear(
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """DDPM's linear schedule: β linear from 1e-4 to 0.02 (Ho et al. 2020, sec. 4; diffusers "linear")."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return _build(betas, "ddpm_linear", zero_terminal_snr)


def scaled_linear(
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """LDM / Stable Diffusion schedule: √β linear from √0.00085 to √0.012 (Rombach et al. 2022; LDM "linear")."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return _build(betas, "scaled_linear", zero_terminal_snr)


def cosine(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False
) -> NoiseSchedule:
    """Cosine schedule ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), β ≤ 0.999 (Nichol & Dhariwal
    2021, eq. 17; diffusers "squaredcos_cap_v2")."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)  # β_t = 1 − ᾱ(t+1)/ᾱ(t), clipped (eq. 17 text)
    return _build(betas, "cosine", zero_terminal_snr)
