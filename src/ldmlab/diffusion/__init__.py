"""Diffusion math as small pure functions: import torch only."""

from ldmlab.diffusion.guidance import classifier_free_guidance, dynamic_threshold, static_threshold
from ldmlab.diffusion.parameterization import EpsPrediction, Prediction, VPrediction, X0Prediction
from ldmlab.diffusion.samplers import StepInfo, ddim_sample, ddpm_sample, dpmpp_2m_sample, euler_sample
from ldmlab.diffusion.schedules import NoiseSchedule, cosine, ddpm_linear, rescale_zero_terminal_snr, scaled_linear
from ldmlab.diffusion.timesteps import karras_sigmas, sample_timesteps, spaced_timesteps
from ldmlab.diffusion.weighting import (
    min_snr_weight,
    noisy_inputs,
    perturb_noise,
    sample_noise,
    uniform_weight,
    weighted_mse,
)

__all__ = [
    "NoiseSchedule",
    "ddpm_linear",
    "scaled_linear",
    "cosine",
    "rescale_zero_terminal_snr",
    "Prediction",
    "EpsPrediction",
    "VPrediction",
    "X0Prediction",
    "uniform_weight",
    "min_snr_weight",
    "sample_noise",
    "perturb_noise",
    "noisy_inputs",
    "weighted_mse",
    "sample_timesteps",
    "spaced_timesteps",
    "karras_sigmas",
    "ddpm_sample",
    "ddim_sample",
    "dpmpp_2m_sample",
    "euler_sample",
    "StepInfo",
    "classifier_free_guidance",
    "static_threshold",
    "dynamic_threshold",
]
