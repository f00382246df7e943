"""Load a KL autoencoder from any of the layouts users bring, without executing pickled code.

Accepted: a Lightning `.ckpt` of `ldmlab.lit.vae.VAEModule`; an ldmlab `vae.safetensors` export (architecture
in its metadata); an SD-original checkpoint (`first_stage_model.*`, `.ckpt` or `.safetensors`); a bare
SD-original/ldmlab VAE state dict; a diffusers `AutoencoderKL` directory (`config.json` +
`diffusion_pytorch_model.safetensors`). `.ckpt`/`.bin`/`.pt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ldmlab.convert.vae import diffusers_to_ldmlab
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.safe_load import load_weights_only

SD_VAE_PREFIX = "first_stage_model."
LIT_VAE_PREFIX = "autoencoder."


def read_state_dict(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors or checkpoint dict, safetensors metadata) from a file; pickles are loaded weights-only."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    return load_weights_only(path), {}  # a pickle that would run code: one-line UnsafeCheckpointError


def strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys under `prefix`, with the prefix removed (others dropped)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def infer_vae_config(sd: dict[str, Tensor], norm_groups: int = 32) -> dict[str, Any]:
    """AutoencoderKL arguments read off an SD-original-layout state dict's shapes (norm_groups, dropout not stored)."""
    base = sd["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "base_channels": base,
        "channel_mult": [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in levels],
        "num_res_blocks": len(blocks),
        "z_channels": sd["decoder.conv_in.weight"].shape[1],
        "embed_dim": sd["post_quant_conv.weight"].shape[1],
        "attn_levels": [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd],
        "mid_attention": "encoder.mid.attn_1.q.weight" in sd,
        "dropout": 0.0,  # training-time only, not stored
        "norm_groups": norm_groups,
    }


def _from_diffusers_dir(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict (ldmlab names) and config of a diffusers AutoencoderKL directory."""
    weights = path / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{path} is a directory but has no diffusion_pytorch_model.safetensors: "
                                "give a diffusers AutoencoderKL directory or a checkpoint file")
    sd = diffusers_to_ldmlab(load_file(str(weights)))
    norm_groups = json.loads((path / "config.json").read_text()).get("norm_num_groups", 32)
    return sd, infer_vae_config(sd, norm_groups)


def _from_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict (ldmlab names) and config from a checkpoint or safetensors file of any known layout."""
    raw, metadata = read_state_dict(path)
    if "state_dict" in raw:  # Lightning checkpoint (VAEModule) or an SD-original .ckpt
        config = raw.get("autoencoder_config")
        raw = raw["state_dict"]
    else:
        config = json.loads(metadata["config"]) if "config" in metadata else None
    for prefix in (LIT_VAE_PREFIX, SD_VAE_PREFIX):
        if any(k.startswith(prefix) for k in raw):
            raw = strip_prefix(raw, prefix)
            break
    if "encoder.conv_in.weight" not in raw:
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in raw:
            raw = diffusers_to_ldmlab(raw)
        else:
            raise ValueError(f"{path}: no autoencoder weights found (expected `encoder.conv_in.weight`, "
                             f"`{SD_VAE_PREFIX}…` or `{LIT_VAE_PREFIX}…` keys)")
    return raw, config or infer_vae_config(raw)


def load_vae(path: str | Path, config: dict[str, Any] | None = None) -> AutoencoderKL:
    """An AutoencoderKL with the weights at `path` (any supported layout), in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE weights '{path}' not found: give a VAEModule .ckpt, an exported "
                                "vae.safetensors, an SD checkpoint or a diffusers AutoencoderKL directory")
    sd, found_config = _from_diffusers_dir(path) if path.is_dir() else _from_file(path)
    vae = AutoencoderKL(**(config or found_config))
    vae.load_state_dict(sd, strict=True)
    return vae.eval()
