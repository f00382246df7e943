"""What the network predicts (ε, v or x0): the single place where targets and conversions live.

Every method comes in two forms. `target`, `to_x0`, `to_eps` take integer timesteps and a NoiseSchedule (the
training step uses these); `*_at` take the scalings α = √ᾱ and σ = √(1−ᾱ) directly (samplers use these,
including at interpolated noise levels). With x_t = α x0 + σ ε and α² + σ² = 1:
    v = α ε − σ x0,   x0 = α x_t − σ v,   ε = σ x_t + α v        (Salimans & Ho 2022, sec. 4 and app. D)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.timesteps import interp_sigmas, sample_timesteps, ve_sigmas
from ldmlab.diffusion.weighting import noisy_inputs

__all__ = ["EpsPrediction", "Prediction", "VPrediction", "X0Prediction"]

Scale = Tensor | float


class Prediction(ABC):
    """Base class of a parameterisation: the training target and the maps model output → x0, ε."""

    name: ClassVar[str]

    @abstractmethod
    def target_at(self, x0: Tensor, noise: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        """Regression target for the model output, given the data, the noise and the scalings."""

    @abstractmethod
    def x0_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        """Predicted clean sample x̂0 from the model output at noise level (α, σ)."""

    @abstractmethod
    def eps_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        """Predicted noise ε̂ from the model output at noise level (α, σ)."""

    @abstractmethod
    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        """Min-SNR-γ weight for this target's MSE (Hang et al. 2023, "Min-SNR Weighting"), finite at SNR = 0."""

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """Regression target at integer timesteps t (shape (B,)), in the dtype of x0."""
        return self.target_at(x0, noise.to(x0.dtype), *schedule.scalings(t, x0))

    def to_x0(self, model_out: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """x̂0 from the model output at integer timesteps t."""
        return self.x0_at(model_out, x_t, *schedule.scalings(t, x_t))

    def to_eps(self, model_out: Tensor, x_t: Tensor, t: Tensor, schedule: NoiseSchedule) -> Tensor:
        """ε̂ from the model output at integer timesteps t."""
        return self.eps_at(model_out, x_t, *schedule.scalings(t, x_t))

    def training_inputs(
        self,
        x0: Tensor,
        schedule: NoiseSchedule | None,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
        min_snr_gamma: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t, target, loss weight) of one batch: t ~ U{0, …, T−1} and DDPM eq. 4 (Algorithm 1); weight 1
        (eq. 14's simple loss) or Min-SNR-γ. The flow objective overrides this with its own path and times."""
        if schedule is None:
            raise ValueError(f"prediction {self.name} needs a noise schedule: set "
                             "model/diffusion/noise_schedule=scaled_linear")
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps, generator, x0.device)
        x_t, target = noisy_inputs(x0, t, schedule, self, offset_noise, input_perturbation, generator)
        snr = schedule.snr(t)  # float64 table kept on t's device: no host sync
        weight = torch.ones_like(snr) if min_snr_gamma is None else self.min_snr_weight(snr, min_snr_gamma)
        return x_t, t, target, weight

    def noise_level(self, t: Tensor, schedule: NoiseSchedule | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α, σ) at the network's time t (B,), shaped (B, 1, …) like `like`: the schedule's (√ᾱ_t, √(1−ᾱ_t)) at
        integer t, and at fractional t (Euler's grid) the VP scalings of the linearly interpolated VE σ, which is
        Euler's own σ (on Karras σ, whose t is log-interpolated, a close approximation of it)."""
        if schedule is None:
            raise ValueError(f"prediction {self.name} needs a noise schedule: set "
                             "model/diffusion/noise_schedule=scaled_linear")
        if not t.is_floating_point():
            return schedule.scalings(t, like)
        sigma_ve = interp_sigmas(ve_sigmas(schedule), t.detach().cpu()).to(like.device)
        alpha = (1.0 + sigma_ve**2).rsqrt().reshape(-1, *([1] * (like.ndim - 1)))  # VE → VP: α = 1/√(1 + σ²)
        return alpha.to(like.dtype), (alpha * sigma_ve.reshape(alpha.shape)).to(like.dtype)

    def noise_path(self, schedule: NoiseSchedule | None) -> str:
        """What fixes x_t given (x0, ε, t): the schedule (ε, v and x0 models share it); a guiding classifier must
        have been trained on the same."""
        if schedule is None:
            raise ValueError(f"prediction {self.name} needs a noise schedule: set "
                             "model/diffusion/noise_schedule=scaled_linear")
        return f"{schedule.name}/T={schedule.num_timesteps}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsPrediction(Prediction):
    """ε-prediction (DDPM, Ho et al. 2020, eq. 11). x̂0 is undefined where ᾱ = 0 (use v there)."""

    name = "eps"

    def target_at(self, x0: Tensor, noise: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return noise

    def x0_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return (x_t - sigma * model_out) / alpha  # DDIM eq. 9

    def eps_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return model_out

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        # At fixed x_t, ‖ε̂ − ε‖² = SNR‖x̂0 − x0‖², so min(SNR, γ)/SNR, written as γ / max(SNR, γ):
        # the same value, and its SNR → 0 limit (1) without 0/0.
        return gamma / snr.clamp(min=gamma)


class VPrediction(Prediction):
    """v-prediction v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""

    name = "v"

    def target_at(self, x0: Tensor, noise: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return alpha * noise - sigma * x0

    def x0_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return alpha * x_t - sigma * model_out

    def eps_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return sigma * x_t + alpha * model_out

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        # At fixed x_t, ‖v̂ − v‖² = ‖x̂0 − x0‖²/σ² = (SNR + 1)‖x̂0 − x0‖²: divide by SNR + 1, not SNR.
        return snr.clamp(max=gamma) / (snr + 1.0)


class X0Prediction(Prediction):
    """x0-prediction ("sample" in diffusers; discussed in Ho et al. 2020, sec. 3.2)."""

    name = "x0"

    def target_at(self, x0: Tensor, noise: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return x0

    def x0_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return model_out

    def eps_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return (x_t - alpha * model_out) / sigma  # DDIM eq. 4 solved for ε

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        return snr.clamp(max=gamma)
