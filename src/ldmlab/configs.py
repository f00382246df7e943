"""Where the Hydra config tree lives: package data (`src/ldmlab/conf`, which the repo's `conf/` links to), so a
non-editable install (`pip install .`) finds it as well as a checkout does. `LDMLAB_CONF` points elsewhere.

Also the resolvers its yaml files use, registered on import (Hydra imports `ldmlab.conf`, which imports this, when
it composes `pkg://ldmlab.conf`; the entry points and tests import it before composing a directory)."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(os.environ.get("LDMLAB_CONF") or str(files("ldmlab") / "conf"))


def unet_out_channels(in_channels: int, variance_target: str) -> int:
    """`${ldmlab.unet_out_channels:in_channels,variance _target_}`: model.unet.out_channels of a
    model/diffusion/variance — its class's `outputs` (1 fixed, 2 learned: [prediction | variance]) per latent
    channel."""
    from hydra.utils import get_class  # imports the variance class (torch) only when a config resolves this

    from ldmlab.diffusion.variance import FixedVariance

    variance = get_class(variance_target)
    if not issubclass(variance, FixedVariance):
        raise TypeError(f"model.diffusion.variance._target_={variance_target} is not a variance: use "
                        "model/diffusion/variance=fixed or model/diffusion/variance=learned")
    return int(in_channels) * variance.outputs


OmegaConf.register_new_resolver("ldmlab.unet_out_channels", unet_out_channels, replace=True)
