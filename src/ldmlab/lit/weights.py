"""Weights in and out of the modules (the U-Net a fine-tune starts from, the safetensors `export_weights` writes)
and the latent scale estimated from data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from safetensors.torch import save_file
from torch import Tensor, nn


def load_unet_init(unet: nn.Module, path: str) -> float | None:
    """Fine-tune from an ldmlab `unet.safetensors` (convert SD/diffusers weights with `python -m ldmlab.convert`);
    returns the latent scale the file's run trained with (its metadata), None when it names none."""
    from safetensors import safe_open

    from ldmlab.convert.checkpoint import load_ldmlab

    if not Path(path).exists():
        raise FileNotFoundError(f"model.training.unet_init='{path}' not found: give an ldmlab unet.safetensors, e.g. "
                                "from `python -m ldmlab.convert --from sd --to ldmlab --unet <ckpt> --out <dir>`")
    state, config = load_ldmlab(path, "unet")
    if config != getattr(unet, "config", config):
        diff = sorted(k for k in config if config.get(k) != unet.config.get(k))
        raise ValueError(f"model.training.unet_init={path} was saved with a different architecture ({', '.join(diff)}): "
                         "make model.unet match it")
    unet.load_state_dict(state)
    rank_zero_info(f"U-Net initialised from {path}")
    with safe_open(str(path), "pt") as f:
        scale = (f.metadata() or {}).get("latent_scale")
    return float(scale) if scale and float(scale) > 0 else None


def save_weights(path: Path, state: dict[str, Tensor], config: dict[str, Any], kind: str, **extra: str) -> Path:
    """`state` as safetensors with ldmlab's metadata: format `ldmlab.<kind>`, the architecture, `extra`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": f"ldmlab.{kind}", "config": json.dumps(config), **extra}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def scale_by_std(raw: Tensor, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> float:
    """LDM scale_by_std: 1/std of the raw latents `raw` (over all ranks with a strategy's sum-reduce)."""
    count = torch.tensor(float(raw.numel()), device=raw.device)
    stats = torch.stack([raw.double().sum(), raw.double().pow(2).sum(), count.double()])
    stats = reduce_sum(stats) if reduce_sum is not None else stats
    mean = stats[0] / stats[2]
    return float(1.0 / (stats[1] / stats[2] - mean**2).sqrt())
