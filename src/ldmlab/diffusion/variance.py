"""Learned variance and L_hybrid (Nichol & Dhariwal 2021, "Improved DDPM", §3.1), as small free functions.

With a learned variance the network outputs 2C channels for C latent channels: [the prediction (ε, v or x0) | v].
The reverse step p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ) then has
    log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t,   frac = (v + 1)/2             (eq. 15; v is not clamped, as there)
and the network trains with L_hybrid = L_simple + λ·L_vlb (eq. 16, λ = 0.001), L_vlb = L_0 + … + L_{T−1} estimated
as T·L_t at the uniform t of L_simple, the mean μ_θ under a stop-gradient (only Σ_θ learns from L_vlb).
Every function takes ᾱ_t and ᾱ_{t−1} of the step (floats or broadcastable tensors), so the strided steps of
a respaced sampler (§4: β = 1 − ᾱ_t/ᾱ_prev) use the same formulas as the training grid. 0-based t as in
schedules.py: ᾱ_{−1} = 1.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor

from ldmlab.diffusion.parameterization import Prediction
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.weighting import weighted_mse

__all__ = ["FixedVariance", "LearnedVariance", "gaussian_nll", "join_output", "learned_log_variance", "normal_kl",
           "posterior_mean", "posterior_variance", "split_output", "vlb_terms"]

Num = TypeVar("Num", Tensor, float)
LOG2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


def split_output(out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
    """(prediction, variance output v or None) of a network output with `channels` or 2·`channels` channels."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] != 2 * channels:
        raise ValueError(f"the network outputs {out.shape[1]} channels for {channels}-channel inputs: expected "
                         f"{channels} (the prediction) or {2 * channels} (the prediction and a learned variance)")
    mean, v = out.split(channels, dim=1)
    return mean, v


def join_output(mean: Tensor, v: Tensor | None) -> Tensor:
    """The inverse of `split_output`: the network output of a prediction and its variance output (if any)."""
    return mean if v is None else torch.cat([mean, v], dim=1)


def posterior_variance(a_t: Num, a_prev: Num) -> Num:
    """β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t with β_t = 1 − ᾱ_t/ᾱ_{t−1} (DDPM eq. 7)."""
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def posterior_mean(x0: Tensor, x_t: Tensor, a_t: Tensor | float, a_prev: Tensor | float) -> Tensor:
    """μ̃_t(x_t, x0) = √ᾱ_{t−1} β_t/(1 − ᾱ_t)·x0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t (DDPM eq. 7)."""
    beta = 1 - a_t / a_prev
    return (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x_t


def learned_log_variance(v: Tensor, log_beta: Tensor | float, log_beta_tilde: Tensor | float) -> Tensor:
    """log Σ_θ = frac·log β_t + (1 − frac)·log β̃_t with frac = (v + 1)/2 (Improved DDPM eq. 15)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """−log N(x; mean, e^logvar) elementwise, in nats: the continuous density (latents are not 8-bit pixels)."""
    return 0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _step_tables(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ᾱ_t, ᾱ_{t−1}, log β_t, log β̃_t clipped) per sample, shaped (B, 1, …), in float64. β̃_0 = 0, so its log
    is "clipped" to log β̃_1 as in the Improved DDPM code (`posterior_log_variance_clipped`)."""
    shape = (-1, *([1] * (like.ndim - 1)))
    a_t = schedule.alpha_bar(t).reshape(shape)
    a_prev = torch.where(t > 0, schedule.alpha_bar((t - 1).clamp(min=0)), 1.0).reshape(shape)
    t1 = t.clamp(min=1)  # β̃ of t = 1 where t = 0
    a1, a1_prev = schedule.alpha_bar(t1).reshape(shape), schedule.alpha_bar(t1 - 1).reshape(shape)
    return a_t, a_prev, torch.log(1 - a_t / a_prev), torch.log(posterior_variance(a1, a1_prev))


def vlb_terms(x0: Tensor, x_t: Tensor, t: Tensor, x0_pred: Tensor, v: Tensor, schedule: NoiseSchedule) -> Tensor:
    """L_t per sample, in bits/dim (Improved DDPM eq. 10–13): KL(q(x_{t−1} | x_t, x0) ‖ p_θ(x_{t−1} | x_t)) for
    t > 0, and the decoder's −log p_θ(x0 | x_t) at t = 0 as a continuous Gaussian NLL (latent space). p_θ's mean
    is the posterior mean at the predicted x̂0 (`x0_pred`), its log-variance eq. 15 of `v`."""
    x0, x_t, x0_pred, v = x0.float(), x_t.float(), x0_pred.float(), v.float()
    a_t, a_prev, log_beta, log_beta_tilde = (c.float() for c in _step_tables(schedule, t, x0))
    model_mean, model_logvar = posterior_mean(x0_pred, x_t, a_t, a_prev), learned_log_variance(v, log_beta,
                                                                                              log_beta_tilde)
    kl = normal_kl(posterior_mean(x0, x_t, a_t, a_prev), log_beta_tilde, model_mean, model_logvar)
    nll = gaussian_nll(x0, model_mean, model_logvar)
    return torch.where(t == 0, nll.flatten(1).mean(1), kl.flatten(1).mean(1)) / LOG2


class FixedVariance:
    """DDPM's fixed variance (σ² = β̃_t or β_t, the sampler's choice): the network predicts the mean's target only
    and trains on L_simple (Ho et al. 2020, eq. 14) with the objective's loss weight."""

    name = "fixed"  # the conf/model/diffusion/variance option
    outputs = 1  # network output channels per latent channel

    def channels_problem(self, in_channels: int, out_channels: int) -> str | None:
        """One line naming the fix if a U-Net with these channels does not fit this variance, else None."""
        want = self.outputs * in_channels
        if out_channels == want:
            return None
        what = "the prediction" if self.outputs == 1 else "the prediction and the variance interpolation"
        return (f"model.unet.out_channels={out_channels} but model/diffusion/variance={self.name} needs {self.outputs} x "
                f"model.unet.in_channels = {want} ({what} per latent channel): set model.unet.out_channels={want}")

    def loss(self, out: Tensor, target: Tensor, weight: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
             schedule: NoiseSchedule | None, prediction: Prediction) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss of one batch, its named parts to log): the weighted MSE of the prediction."""
        return weighted_mse(out, target, weight), {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LearnedVariance(FixedVariance):
    """Improved DDPM's learned variance (§3.1): 2C network outputs, L_hybrid = L_simple + λ·L_vlb (eq. 16)."""

    name, outputs = "learned", 2

    def __init__(self, vlb_weight: float = 0.001) -> None:
        if not vlb_weight > 0:
            raise ValueError(f"model.diffusion.variance.vlb_weight={vlb_weight} must be > 0 (Improved DDPM's λ = 0.001): "
                             "without the VLB term the variance output never learns; use model/diffusion/variance=fixed")
        self.vlb_weight = vlb_weight

    def loss(self, out: Tensor, target: Tensor, weight: Tensor, x0: Tensor, x_t: Tensor, t: Tensor,
             schedule: NoiseSchedule | None, prediction: Prediction) -> tuple[Tensor, dict[str, Tensor]]:
        """L_simple (weighted) on the prediction + λ·T·L_t on the variance, the mean stopped (§3.1)."""
        if schedule is None:
            raise ValueError("model/diffusion/variance=learned needs a noise schedule for its VLB term: set "
                             "model/diffusion/noise_schedule=scaled_linear, or use model/diffusion/variance=fixed")
        mean, v = split_output(out, x_t.shape[1])
        assert v is not None, "split_output of a 2C output"
        simple = weighted_mse(mean, target, weight)
        # stop-gradient on the mean: L_vlb trains Σ_θ only (§3.1, "we apply a stop-gradient to the μ_θ(x_t, t) output")
        x0_pred = prediction.to_x0(mean.detach(), x_t, t, schedule)
        vlb = schedule.num_timesteps * vlb_terms(x0, x_t, t, x0_pred, v, schedule).mean()  # L_vlb ≈ T·E_t[L_t]
        return simple + self.vlb_weight * vlb, {"loss_simple": simple.detach(), "loss_vlb": vlb.detach()}

    def __repr__(self) -> str:
        return f"LearnedVariance(vlb_weight={self.vlb_weight})"
