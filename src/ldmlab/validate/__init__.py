"""Config checks that run before anything heavy, one line per problem naming the config field and a fix.

`validate_config` runs first in `ldmlab.run.train` (before data, weights or the Trainer are built, so a typo
costs seconds, not a shard build or a DDP launch); `validate_sample` first in `ldmlab.sample.sample`;
`exit_on_bad_overrides` in train.py before `hydra.main`, because Hydra reports an unknown group option
(`model=unet_foo`) or an unquoted `{` in its own words before any of our code runs. Network shapes are judged
by the networks' own constructors, run on the meta device (networks.py); only rules that span config groups are
written here. Nothing here imports diffusers or reads tensor data: weight files are inspected through their
metadata, JSON configs, or a memory-mapped weights-only load of the pickle (which also refuses files that would
run code, before the run starts).
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from ldmlab.messages import EMA_UNDER_FSDP
from ldmlab.validate.files import data_problems, weight_problems
from ldmlab.validate.overrides import exit_on_bad_overrides, override_problems
from ldmlab.validate.rules import (
    batch_problems,
    finetune_problems,
    fsdp_problems,
    guidance_problems,
    image_condition_problems,
    missing_values,
    objective_problems,
    variance_problems,
)
from ldmlab.validate.sample import sample_problems

__all__ = ["EMA_UNDER_FSDP", "ConfigError", "check_config", "exit_on_bad_overrides", "override_problems",
           "sample_problems", "validate_config", "validate_sample"]


class ConfigError(ValueError, CompactHydraException):
    """Config problems, one line each; a CompactHydraException, so Hydra prints them without a traceback."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def check_config(cfg: DictConfig, entry: str = "train.py", files: bool = True) -> list[str]:
    """Every problem of a composed train config, one line each ([] when it is fine). files=False leaves out the
    rules that read data and weight files: a pipeline checks a stage before the stages that write them have run."""
    from ldmlab.validate.networks import network_problems  # torch: not needed by the command-line check

    missing = missing_values(cfg, entry)
    rules = (*((data_problems, weight_problems) if files else ()), network_problems, guidance_problems,
             objective_problems, variance_problems, batch_problems, fsdp_problems, finetune_problems,
             image_condition_problems)
    return missing + [line for rule in rules for line in rule(cfg)]


def validate_config(cfg: DictConfig, entry: str = "train.py") -> None:
    """Raise ConfigError listing every problem of `cfg` (before any data, weights or trainer are built)."""
    if problems := check_config(cfg, entry):
        raise ConfigError(problems)


def validate_sample(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of a sample.py config (before the model is rebuilt)."""
    if problems := sample_problems(cfg):
        raise ConfigError(problems)
