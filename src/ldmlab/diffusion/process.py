"""Diffusion: one object for the process a denoiser is trained on and sampled from (`model.diffusion`).

The four choices that only make sense together live here, so a module takes one argument and a config one node:
the noise schedule (ᾱ_t; None for flow matching, whose path x_t = (1 − t)·x0 + t·ε needs none), the objective
(`Prediction`: ε, v, x0 or the flow's velocity), the variance (DDPM's fixed one, or Improved DDPM's learned
interpolation trained with L_hybrid) and the sampler of the reverse process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldmlab.diffusion.parameterization import Prediction
from ldmlab.diffusion.schedules import NoiseSchedule
from ldmlab.diffusion.variance import FixedVariance

Sampler = Callable[..., Tensor]
Denoise = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Diffusion:
    """Schedule + objective + variance + sampler. `sampler` may be None for a model that never samples (the noise-
    aware classifier, which only needs the forward process)."""

    prediction: Prediction
    noise_schedule: NoiseSchedule | None = None
    variance: FixedVariance = field(default_factory=FixedVariance)
    sampler: Sampler | None = None

    def training_inputs(self, x0: Tensor, generator: torch.Generator | None = None, offset_noise: float = 0.0,
                        input_perturbation: float = 0.0, min_snr_gamma: float | None = None
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t, t, target, loss weight) of one batch of clean latents (DDPM eq. 4, or the flow's path)."""
        return self.prediction.training_inputs(x0, self.noise_schedule, generator, offset_noise, input_perturbation,
                                               min_snr_gamma)

    def loss(self, out: Tensor, target: Tensor, weight: Tensor, x0: Tensor, x_t: Tensor,
             t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(the batch's loss, named parts to log): L_simple, + λ·L_vlb with a learned variance (IDDPM eq. 16)."""
        return self.variance.loss(out, target, weight, x0, x_t, t, self.noise_schedule, self.prediction)

    def sample(self, denoise: Denoise, x_T: Tensor, sampler: Sampler | None = None, **kwargs: Any) -> Tensor:
        """x_0 from x_T by `sampler` (default: this process's own), kwargs (generator, callback) passed on."""
        run = sampler or self.sampler
        if run is None:
            raise ValueError("model.diffusion.sampler is null: set model/diffusion/sampler=ddim (or another)")
        return run(denoise, x_T, self.noise_schedule, self.prediction, **kwargs)
