"""Training-side pieces of the diffusion loss: loss weights, offset noise, input perturbation.

A LightningModule's step is then: t = sample_timesteps(...); x_t, target = noisy_inputs(...);
loss = weighted_mse(model(x_t, t), target, weighting(schedule.snr(t), prediction)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldmlab.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:  # for annotations only: parameterization imports this module (Prediction.training_inputs)
    from ldmlab.diffusion.parameterization import Prediction

__all__ = [
    "min_snr_weight",
    "noisy_inputs",
    "perturb_noise",
    "sample_noise",
    "uniform_weight",
    "weighted_mse",
]


def uniform_weight(snr: Tensor, prediction: Prediction) -> Tensor:
    """Weight 1 for every t: the "simple" loss (Ho et al. 2020, eq. 14)."""
    return torch.ones_like(snr)


def min_snr_weight(snr: Tensor, prediction: Prediction, gamma: float = 5.0) -> Tensor:
    """Min-SNR-γ weight (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v, min(SNR, γ) for x0."""
    return prediction.min_snr_weight(snr, gamma)


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian ε, plus s·ε_c with ε_c constant over the spatial dims: offset noise (Guttenberg 2023)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if offset_noise:
        per_channel = x0.shape[:2] + (1,) * (x0.ndim - 2)  # (B, C, 1, 1): shifts the mean of each channel
        noise = noise + offset_noise * torch.randn(
            per_channel, generator=generator, device=x0.device, dtype=x0.dtype
        )
    return noise


def perturb_noise(noise: Tensor, gamma: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """ε + γξ, the noise that builds x_t under input perturbation (Ning et al. 2023, "Input Perturbation
    Reduces Exposure Bias in Diffusion Models"); the regression target keeps ε."""
    xi = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * xi


def noisy_inputs(
    x0: Tensor,
    t: Tensor,
    schedule: NoiseSchedule,
    prediction: Prediction,
    offset_noise: float = 0.0,
    input_perturbation: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(x_t, target) for one training step: DDPM eq. 4 with optional offset noise and input perturbation."""
    noise = sample_noise(x0, offset_noise, generator)
    noise_in = perturb_noise(noise, input_perturbation, generator) if input_perturbation else noise
    return schedule.add_noise(x0, noise_in, t), prediction.target(x0, noise, t, schedule)


def weighted_mse(model_out: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Σ_b w_b · mean‖model_out_b − target_b‖² / B: per-sample MSE times its loss weight, averaged."""
    per_sample = (model_out.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (weight.to(per_sample) * per_sample).mean()
