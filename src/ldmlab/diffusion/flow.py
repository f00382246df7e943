"""Flow matching / rectified flow: the straight path x_t = (1 − t)·x0 + t·ε and its velocity v = ε − x0.

(Lipman et al. 2023, "Flow Matching"; Liu et al. 2023, "Rectified Flow"; the SD3 recipe of Esser et al. 2024,
"Scaling Rectified Flow Transformers", §2–3.1.) Time t ∈ [0, 1] is also the noise level σ (α = 1 − t): the
network sees t·T (T = `num_timesteps`, 1000 as in SD3 and diffusers) and predicts v; x̂0 = x_t − t·v,
ε̂ = x_t + (1 − t)·v. Samplers for this objective are in `flow_samplers.py`.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import torch
from torch import Tensor

from ldmlab.diffusion.parameterization import Prediction, Scale
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.weighting import perturb_noise, sample_noise

__all__ = ["Density", "FlowMatching", "flow_timesteps", "mode_density", "shift_sigmas"]

Density = Literal["uniform", "logit_normal", "mode"]
DENSITIES = ("uniform", "logit_normal", "mode")
TimeT = TypeVar("TimeT", Tensor, float)  # a time as a tensor or a Python float


def shift_sigmas(t: TimeT, shift: float) -> TimeT:
    """SD3's resolution shift t' = s·t / (1 + (s − 1)·t) (Esser et al. 2024, §5.3.2); s = 1 is identity."""
    return shift * t / (1 + (shift - 1) * t)


def mode_density(u: Tensor, scale: float) -> Tensor:
    """Mode sampling with heavy tails: f(u; s) = 1 − u − s·(cos²(π/2·u) − 1 + u) (Esser et al. 2024, §3.1);
    s = 0 is uniform, s > 0 puts more weight on mid t (needs −1 ≤ s ≤ 2/(π − 2) for f to stay monotone)."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def flow_timesteps(
    n: int,
    density: Density = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """n training times t ∈ [0, 1], float32: drawn from `density` (Esser et al. 2024, §3.1), then shifted (§5.3.2).

    logit_normal: t = sigmoid(u), u ~ N(mean, std); mode: t = f(u; mode_scale), u ~ U(0, 1) (as diffusers'
    `compute_density_for_timestep_sampling`)."""
    if density == "logit_normal":
        u = torch.randn(n, generator=generator, device=device) * logit_std + logit_mean
        t = torch.sigmoid(u)
    elif density in ("uniform", "mode"):
        t = torch.rand(n, generator=generator, device=device)
        t = mode_density(t, mode_scale) if density == "mode" else t
    else:
        raise ValueError(f"model.diffusion.prediction.density={density!r} is unknown: use one of {', '.join(DENSITIES)}")
    return shift_sigmas(t, shift)


class FlowMatching(Prediction):
    """Flow-matching objective: the network predicts v = ε − x0 on x_t = (1 − t)·x0 + t·ε (Lipman et al. 2023,
    §4.1's OT path with σ_min = 0, time reversed; Esser et al. 2024, §2–3). The (α, σ) of the `*_at` methods are (1 − t, t)."""

    name = "flow"

    def __init__(self, density: Density = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, shift: float = 1.0, num_timesteps: int = 1000) -> None:
        if density not in DENSITIES:
            raise ValueError(f"model.diffusion.prediction.density={density!r} is unknown: use one of "
                             f"{', '.join(DENSITIES)}")
        if not -1 <= mode_scale <= 2 / (math.pi - 2):  # beyond, f_mode leaves [0, 1] (SD3 §3.1)
            raise ValueError(f"model.diffusion.prediction.mode_scale={mode_scale} must be in "
                             f"[-1, {2 / (math.pi - 2):.3f}] "
                             "(SD3 §3.1), e.g. mode_scale=1.29")
        if shift <= 0 or logit_std <= 0 or num_timesteps < 1:
            raise ValueError(f"model.diffusion.prediction: shift={shift} and logit_std={logit_std} must be > 0 and "
                             f"num_timesteps={num_timesteps} >= 1, e.g. shift=3.0 logit_std=1.0 num_timesteps=1000")
        self.density, self.logit_mean, self.logit_std = density, logit_mean, logit_std
        self.mode_scale, self.shift, self.num_timesteps = mode_scale, shift, num_timesteps

    def target_at(self, x0: Tensor, noise: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return noise - x0  # d x_t / dt of the straight path

    def x0_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return x_t - sigma * model_out

    def eps_at(self, model_out: Tensor, x_t: Tensor, alpha: Scale, sigma: Scale) -> Tensor:
        return x_t + alpha * model_out

    def min_snr_weight(self, snr: Tensor, gamma: float) -> Tensor:
        # x̂0 − x0 = −t·(v̂ − v) at fixed x_t, and t = 1/(1 + √SNR) with SNR = (1 − t)²/t²: min(SNR, γ)·t²
        return snr.clamp(max=gamma) / (1.0 + snr.sqrt()) ** 2

    def training_inputs(
        self,
        x0: Tensor,
        schedule: NoiseSchedule | None,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
        min_snr_gamma: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t·T for the network, target v, loss weight) of one batch; `schedule` is not used (the path is
        fixed). Times from the density (SD3 §3.1), noise as in the ε-objectives (offset noise, input perturbation)."""
        t = flow_timesteps(x0.shape[0], self.density, self.logit_mean, self.logit_std, self.mode_scale, self.shift,
                           generator, x0.device)
        noise = sample_noise(x0, offset_noise, generator)
        noise_in = perturb_noise(noise, input_perturbation, generator) if input_perturbation else noise
        tb = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise_in  # rectified flow's path (Esser et al. 2024, §3): a_t = 1 − t, b_t = t
        weight = torch.ones_like(t) if min_snr_gamma is None else self.min_snr_weight(((1 - t) / t) ** 2,
                                                                                     min_snr_gamma)
        return x_t, t * self.num_timesteps, self.target_at(x0, noise, 1 - tb, tb), weight

    def noise_level(self, t: Tensor, schedule: NoiseSchedule | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α, σ) = (1 − s, s) at the network's time t = s·T, shaped (B, 1, …) like `like` (schedule unused)."""
        s = (t.to(torch.float64) / self.num_timesteps).reshape(-1, *([1] * (like.ndim - 1))).to(like.device)
        return (1 - s).to(like.dtype), s.to(like.dtype)

    def noise_path(self, schedule: NoiseSchedule | None) -> str:
        """The straight path's identity (the schedule is not used)."""
        return f"flow/T={self.num_timesteps}"

    def __repr__(self) -> str:
        return (f"FlowMatching(density={self.density!r}, logit_mean={self.logit_mean}, logit_std={self.logit_std}, "
                f"mode_scale={self.mode_scale}, shift={self.shift}, num_timesteps={self.num_timesteps})")
