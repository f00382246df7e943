"""Hydra configs of model/diffusion/noise_schedule, model/diffusion/prediction, model/diffusion/variance and model/diffusion/sampler: every file composes
and instantiates, and swapping any of the groups composes with the others into a working sampler call."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ldmlab.diffusion import FixedVariance, NoiseSchedule, Prediction, StepInfo

REPO = Path(__file__).resolve().parents[1]
CONF, TEST_CONF = REPO / "conf", REPO / "tests" / "configs"
SCHEDULES = sorted(p.stem for p in (CONF / "model" / "diffusion" / "noise_schedule").glob("*.yaml"))
PREDICTIONS = sorted(p.stem for p in (CONF / "model" / "diffusion" / "prediction").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONF / "model" / "diffusion" / "sampler").glob("*.yaml"))
VARIANCES = sorted(p.stem for p in (CONF / "model" / "diffusion" / "variance").glob("*.yaml"))


def test_config_files_present():
    assert SCHEDULES == ["cosine", "ddpm_linear", "scaled_linear"]
    assert PREDICTIONS == ["eps", "flow", "v", "x0"]
    assert SAMPLERS == ["ddim", "ddpm", "dpmpp_2m", "euler", "flow_euler", "flow_heun"]
    assert VARIANCES == ["fixed", "learned"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(TEST_CONF), version_base="1.3"):
        return compose("diffusion_test", overrides=[f"hydra.searchpath=[file://{CONF}]", *overrides])


def test_defaults_are_stable_diffusion():
    cfg = _compose([])
    schedule, prediction = instantiate(cfg.model.diffusion.noise_schedule), instantiate(cfg.model.diffusion.prediction)
    assert isinstance(schedule, NoiseSchedule) and schedule.name == "scaled_linear"
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085) and prediction.name == "eps"
    assert cfg.model.diffusion.sampler.num_steps == 50 and cfg.model.diffusion.sampler.steps_offset == 1


@pytest.mark.parametrize("zero_snr", [False, True])
def test_swapping_groups_composes(zero_snr):
    """Every schedule × prediction × sampler composes, instantiates and samples (3 steps, tiny T)."""
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    denoise = lambda x, t: 0.1 * x
    spacing = ["model.diffusion.sampler.spacing=trailing"] if zero_snr else []
    for sched, pred, sampler in itertools.product(SCHEDULES, PREDICTIONS, SAMPLERS):
        if zero_snr and pred == "eps":  # ε-prediction cannot give x0 where ᾱ = 0 (Lin et al. 2024)
            continue
        if (pred == "flow") != sampler.startswith("flow_"):  # refused at config time (validate.rules)
            continue
        if zero_snr and pred == "flow":  # the flow path ignores the schedule; its samplers have no spacing
            continue
        cfg = _compose(
            [
                f"model/diffusion/noise_schedule={sched}",
                f"model/diffusion/prediction={pred}",
                f"model/diffusion/sampler={sampler}",
                "model.diffusion.noise_schedule.num_timesteps=50",
                f"model.diffusion.noise_schedule.zero_terminal_snr={zero_snr}",
                "model.diffusion.sampler.num_steps=3",
                *spacing,
            ]
        )
        schedule, prediction = instantiate(cfg.model.diffusion.noise_schedule), instantiate(cfg.model.diffusion.prediction)
        sample = instantiate(cfg.model.diffusion.sampler)
        assert schedule.num_timesteps == 50 and isinstance(prediction, Prediction) and prediction.name == pred
        assert (schedule.alphas_cumprod[-1].item() == 0.0) == zero_snr
        steps: list[StepInfo] = []
        out = sample(
            denoise,
            x_T,
            schedule,
            prediction,
            generator=torch.Generator().manual_seed(1),
            callback=steps.append,
        )
        assert out.shape == x_T.shape and torch.isfinite(out).all() and [s.i for s in steps] == [0, 1, 2], (
            sched,
            pred,
            sampler,
        )


def test_threshold_config_instantiates():
    cfg = _compose(
        [
            "model/diffusion/sampler=ddpm",
            "model.diffusion.sampler.num_steps=4",
            "model.diffusion.noise_schedule.num_timesteps=40",
            "model.diffusion.sampler.threshold={_target_: ldmlab.diffusion.guidance.dynamic_threshold, "
            + "_partial_: true, ratio: 0.9}",
        ]
    )
    sample = instantiate(cfg.model.diffusion.sampler)
    schedule, prediction = instantiate(cfg.model.diffusion.noise_schedule), instantiate(cfg.model.diffusion.prediction)
    out = sample(lambda x, t: -5 * x, torch.randn(2, 3, 4, 4), schedule, prediction)
    assert out.abs().max() <= 1.0 + 1e-6  # the last step returns the thresholded x̂0


@pytest.mark.parametrize("variance", VARIANCES)
def test_every_variance_samples_with_every_ddpm_family_sampler(variance):
    """Each model/diffusion/variance option instantiates, and each DDPM-family sampler runs a network of its output width
    (C channels, or 2C: the prediction and the variance interpolation)."""
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for sampler in (s for s in SAMPLERS if not s.startswith("flow_")):
        cfg = _compose([f"model/diffusion/variance={variance}", f"model/diffusion/sampler={sampler}", "model.diffusion.sampler.num_steps=3",
                        "model.diffusion.noise_schedule.num_timesteps=50"])
        var = instantiate(cfg.model.diffusion.variance)
        assert isinstance(var, FixedVariance) and var.name == variance
        denoise = lambda x, t, n=var.outputs: torch.cat([0.1 * x] * n, 1)
        out = instantiate(cfg.model.diffusion.sampler)(denoise, x_T, instantiate(cfg.model.diffusion.noise_schedule),
                                             instantiate(cfg.model.diffusion.prediction), generator=torch.Generator())
        assert out.shape == x_T.shape and torch.isfinite(out).all(), (variance, sampler)
