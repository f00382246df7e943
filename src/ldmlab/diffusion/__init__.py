"""Diffusion math as small pure functions: import torch only."""

from ldmlab.diffusion.flow import FlowMatching, flow_timesteps, mode_density, shift_sigmas
from ldmlab.diffusion.flow_samplers import flow_euler_sample, flow_heun_sample, flow_sigmas
from ldmlab.diffusion.guidance import (
    classifier_free_guidance,
    classifier_gradient,
    classifier_guidance,
    dynamic_threshold,
    static_threshold,
)
from ldmlab.diffusion.parameterization import EpsPrediction, Prediction, VPrediction, X0Prediction
from ldmlab.diffusion.process import Diffusion
from ldmlab.diffusion.samplers import StepInfo, ddim_sample, ddpm_sample, dpmpp_2m_sample, euler_sample
from ldmlab.diffusion.schedules import (
    NoiseSchedule,
    cosine,
    ddpm_linear,
    rescale_zero_terminal_snr,
    scaled_linear,
)
from ldmlab.diffusion.timesteps import karras_sigmas, sample_timesteps, spaced_timesteps
from ldmlab.diffusion.variance import (
    FixedVariance,
    LearnedVariance,
    gaussian_nll,
    learned_log_variance,
    normal_kl,
    posterior_mean,
    posterior_variance,
    vlb_terms,
)
from ldmlab.diffusion.weighting import (
    min_snr_weight,
    noisy_inputs,
    perturb_noise,
    sample_noise,
    uniform_weight,
    weighted_mse,
)

__all__ = [
    "Diffusion",
    "EpsPrediction",
    "FixedVariance",
    "FlowMatching",
    "LearnedVariance",
    "NoiseSchedule",
    "Prediction",
    "StepInfo",
    "VPrediction",
    "X0Prediction",
    "classifier_free_guidance",
    "classifier_gradient",
    "classifier_guidance",
    "cosine",
    "ddim_sample",
    "ddpm_linear",
    "ddpm_sample",
    "dpmpp_2m_sample",
    "dynamic_threshold",
    "euler_sample",
    "flow_euler_sample",
    "flow_heun_sample",
    "flow_sigmas",
    "flow_timesteps",
    "gaussian_nll",
    "karras_sigmas",
    "learned_log_variance",
    "min_snr_weight",
    "mode_density",
    "noisy_inputs",
    "normal_kl",
    "perturb_noise",
    "posterior_mean",
    "posterior_variance",
    "rescale_zero_terminal_snr",
    "sample_noise",
    "sample_timesteps",
    "scaled_linear",
    "shift_sigmas",
    "spaced_timesteps",
    "static_threshold",
    "uniform_weight",
    "vlb_terms",
    "weighted_mse",
]
