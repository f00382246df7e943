"""The training entry: resolve what the machine decides, check the config, then fit (ldmlab.fit).

Lightning is imported only after the check: its import takes ~5 s of a `python train.py` start on a CPU machine,
so a config problem is reported in ~2 s, before it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ldmlab.machine import resolve_machine
from ldmlab.validate import validate_config


def train(cfg: DictConfig) -> float | None:
    """Resolve the machine, check the config, then seed, build, fit; return the optimised metric."""
    resolve_machine(cfg)  # accelerator, devices, precision, DDP, speed switches: once, before any rule reads them
    validate_config(cfg)  # one line per config problem, before any data, weights or trainer is built
    from ldmlab.fit import fit  # Lightning's import: only for a config that passed (see the module docstring)

    return fit(cfg)
