"""The LDM's grouped settings (model.training, model.sampling): typed, with one-line errors for unknown keys."""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Training:
    """model.training: CFG condition dropout (Ho & Salimans 2022), the loss weighting (uniform | min_snr, Hang et
    al. 2023), offset noise and input perturbation (Ning et al. 2023)."""

    p_uncond: float = 0.1
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0
    input_perturbation: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_weighting not in ("uniform", "min_snr"):
            raise ValueError(f"model.training.loss_weighting={self.loss_weighting!r}: valid are uniform, min_snr")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"model.training.p_uncond={self.p_uncond} must be in [0, 1)")


@dataclass(frozen=True)
class Sampling:
    """model.sampling: the guidance scales of the validation grids and the seed of their (and val/loss's) noise."""

    guidance_scales: tuple[float, ...] = (1.0, 5.0)
    sample_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_scales", tuple(self.guidance_scales))  # a config list


def settings(cls: type, given: dict[str, Any] | None, field: str) -> Any:
    """`cls` from a config dict; an unknown key is one line naming it and the valid ones."""
    valid = [f.name for f in fields(cls)]
    if unknown := sorted(set(given or {}) - set(valid)):
        raise ValueError(f"model.{field}.{unknown[0]} is unknown: valid are {', '.join(valid)}")
    return cls(**(given or {}))


def regroup(model: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stored `model` config from before model.training and model.sampling, with its flat keys moved there."""
    for group, cls in (("training", Training), ("sampling", Sampling)):
        for name in [f.name for f in fields(cls) if f.name in model]:
            if group not in model:
                model[group] = {}
            model[group][name] = model.pop(name)
    return model
