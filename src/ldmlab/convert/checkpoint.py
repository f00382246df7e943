"""Whole-model weight files: SD-original checkpoints, ldmlab safetensors exports and diffusers directories.

- SD-original (CompVis LDM) single checkpoint: `model.diffusion_model.*` (U-Net) and `first_stage_model.*`
  (VAE), with ldmlab names after the prefix; optional EMA copies under `model_ema.<key without dots>`.
- ldmlab: `unet.safetensors` / `vae.safetensors` with our names and `{"format": "ldmlab.unet"|"ldmlab.vae",
  "config": json}` metadata (as `VAEModule.export_weights` and `LatentDiffusionModule.export_weights` write),
  plus `"sample_size"` (the U-Net's latent side, the VAE's image side) where the writer knows it; and the LDM's
  Lightning training checkpoints (`unet.*` / `vae.*` weights, `unet_config`, `vae_config`, `latent_shape`).
- diffusers: a model directory with `config.json` + `diffusion_pytorch_model.safetensors`, loadable offline by
  `UNet2DConditionModel.from_pretrained(dir)` / `AutoencoderKL.from_pretrained(dir)`; the config JSON is
  written here from our config, so no diffusers import is needed.
Nothing here unpickles code: safetensors, or `torch.load(weights_only=True)` through `read_state_dict`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldmlab.convert.load import read_state_dict
from ldmlab.convert.unet import (
    DIFFUSERS_VERSION,
    diffusers_unet_config,
    unet_ldmlab_to_diffusers,
    upgrade_unet_config,
)
from ldmlab.convert.vae import ldmlab_to_diffusers as vae_ldmlab_to_diffusers
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.unet import UNetModel

SD_UNET_PREFIX = "model.diffusion_model."
SD_VAE_PREFIX = "first_stage_model."
SD_EMA_PREFIX = "model_ema."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SD_VAE_SCALING_FACTOR = 0.18215  # SD1.x latent scale (REFERENCE.md); diffusers keeps it in the VAE config


def _sd_ema_key(key: str) -> str:
    """LDM `LitEma` buffer name of a U-Net parameter: 'model_ema.' + the key without 'model.' and dots."""
    return SD_EMA_PREFIX + key[len("model.") :].replace(".", "")


def split_sd_checkpoint(sd: dict[str, Any], ema: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(U-Net, VAE) state dicts with ldmlab names from an SD-original checkpoint dict (EMA U-Net if `ema`)."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # an SD .ckpt wraps its tensors
        sd = sd["state_dict"]
    unet, vae = {}, {}
    for key, value in sd.items():
        if key.startswith(SD_UNET_PREFIX):
            ema_key = _sd_ema_key(key)
            if ema and ema_key not in sd:
                raise ValueError(
                    f"ema=True but '{ema_key}' is missing: this checkpoint has no EMA weights, "
                    "convert without --ema"
                )
            unet[key[len(SD_UNET_PREFIX) :]] = sd[ema_key] if ema else value
        elif key.startswith(SD_VAE_PREFIX):
            vae[key[len(SD_VAE_PREFIX) :]] = value
    return unet, vae


def join_sd_checkpoint(
    unet: dict[str, Tensor] | None = None, vae: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """One SD-original-layout state dict from ldmlab-named U-Net and/or VAE state dicts."""
    out = {SD_UNET_PREFIX + k: v for k, v in (unet or {}).items()}
    out.update({SD_VAE_PREFIX + k: v for k, v in (vae or {}).items()})
    return out


def _standalone(t: Tensor) -> Tensor:
    """A detached, contiguous CPU tensor owning exactly its storage (copied only if it is a view of more)."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def standalone_tensors(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """State dict safetensors can write: no views into shared or larger storage (e.g. tied weights)."""
    return {k: _standalone(v) for k, v in sd.items()}


# ---------------------------------------------------------------- ldmlab files


def save_ldmlab(
    sd: dict[str, Tensor], config: dict[str, Any], path: str | Path, kind: str, sample_size: int | None = None
) -> Path:
    """Write `sd` (ldmlab names) with {"format": "ldmlab.<kind>", "config": json[, "sample_size"]} metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": f"ldmlab.{kind}", "config": json.dumps(config)}
    if sample_size is not None:
        metadata["sample_size"] = str(sample_size)
    save_file(standalone_tensors(sd), str(path), metadata=metadata)
    return path


def ldmlab_sample_size(path: str | Path) -> int | None:
    """The `sample_size` an ldmlab export records (the size its model was trained at), None if it has none."""
    with safe_open(str(path), "pt") as f:
        size = (f.metadata() or {}).get("sample_size")
    return int(size) if size else None


def load_training_checkpoint(
    raw: dict[str, Any], path: Path, kind: str, ema: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any], int | None]:
    """(state dict, config, sample size) of the U-Net or VAE in a training checkpoint `raw` read from `path`.

    The LDM's holds both (`unet.*`, `vae.*`), a VAE run's the VAE (`autoencoder.*`). The sample size comes from
    the latent shape the LDM trained on (the VAE's: times its downsampling factor); a VAE run does not record it.
    """
    prefix = next((p for p in (kind, "autoencoder" if kind == "vae" else None) if f"{p}_config" in raw), None)
    if prefix is None:
        raise ValueError(f"{path} has no '{kind}_config': give a training checkpoint (run/checkpoints/last.ckpt) "
                         f"of a run with a {kind}, or an ldmlab {kind}.safetensors export")
    config = dict(raw[f"{prefix}_config"])
    if kind == "unet":  # written before later UNetModel arguments existed: their defaults
        config = upgrade_unet_config(config)
    sd = {k[len(prefix) + 1 :]: v for k, v in raw["state_dict"].items() if k.startswith(f"{prefix}.")}
    if ema and kind == "unet":
        if "EMA" not in raw.get("callbacks", {}):
            raise ValueError(f"--ema but {path} holds no EMA weights (callbacks.ema was off): convert without --ema")
        sd.update(raw["callbacks"]["EMA"]["shadow"])
    latent = raw.get("latent_shape")
    if latent is None:
        return sd, config, None
    factor = 2 ** (len(config["channel_mult"]) - 1) if kind == "vae" else 1  # one downsample per level but the last
    return sd, config, int(latent[-1]) * factor


def load_ldmlab(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, config) of an ldmlab `unet.safetensors` / `vae.safetensors` export."""
    sd, metadata = read_state_dict(Path(path))
    if metadata.get("format") != f"ldmlab.{kind}" or "config" not in metadata:
        raise ValueError(
            f"{path} has format={metadata.get('format')!r}, expected 'ldmlab.{kind}' with a config: "
            "give a file written by export_weights or `python -m ldmlab.convert --to ldmlab`"
        )
    config = json.loads(metadata["config"])
    return sd, upgrade_unet_config(config) if kind == "unet" else config


# ---------------------------------------------------------------- diffusers directories


def diffusers_vae_config(
    config: dict[str, Any], scaling_factor: float = SD_VAE_SCALING_FACTOR, sample_size: int = 512
) -> dict[str, Any]:
    """diffusers `AutoencoderKL` config (as in its config.json) of an ldmlab AutoencoderKL `config`."""
    if config["embed_dim"] != config["z_channels"]:
        raise ValueError(
            f"embed_dim={config['embed_dim']} != z_channels={config['z_channels']}: diffusers' "
            "AutoencoderKL has one latent_channels, export only VAEs with embed_dim == z_channels"
        )
    levels, attn = len(config["channel_mult"]), set(config["attn_levels"])
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(levels)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(range(levels))
        ],
        "block_out_channels": [config["base_channels"] * m for m in config["channel_mult"]],
        "layers_per_block": config["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": config["z_channels"],
        "norm_num_groups": config["norm_groups"],
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": config.get("mid_attention", True),
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "_ldmlab_config": dict(config),  # diffusers ignores "_" keys; lets the reverse trip be exact
    }


def ldmlab_vae_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """ldmlab `AutoencoderKL` arguments of a diffusers `AutoencoderKL` config (exact if ldmlab wrote it)."""
    if "_ldmlab_config" in cfg:
        return dict(cfg["_ldmlab_config"])
    widths = list(cfg["block_out_channels"])
    return {
        "in_channels": cfg.get("in_channels", 3),
        "out_channels": cfg.get("out_channels", 3),
        "base_channels": widths[0],
        "channel_mult": [w // widths[0] for w in widths],
        "num_res_blocks": cfg.get("layers_per_block", 1),
        "z_channels": cfg.get("latent_channels", 4),
        "embed_dim": cfg.get("latent_channels", 4),
        "attn_levels": [i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("Attn")],
        "mid_attention": cfg.get("mid_block_add_attention", True),
        "dropout": 0.0,
        "norm_groups": cfg.get("norm_num_groups", 32),
    }


def write_diffusers_dir(sd: dict[str, Tensor], config: dict[str, Any], dirpath: str | Path) -> Path:
    """Write a diffusers model directory: `config.json` and `diffusion_pytorch_model.safetensors`."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(standalone_tensors(sd), str(dirpath / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    return dirpath


def read_diffusers_dir(dirpath: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict with diffusers names, diffusers config) of a diffusers model directory."""
    dirpath = Path(dirpath)
    weights = dirpath / DIFFUSERS_WEIGHTS
    if not weights.exists() or not (dirpath / "config.json").exists():
        raise FileNotFoundError(
            f"{dirpath} lacks config.json or {DIFFUSERS_WEIGHTS}: give a diffusers model "
            "directory such as <pipeline>/unet or <pipeline>/vae"
        )
    return load_file(str(weights)), json.loads((dirpath / "config.json").read_text())


def save_diffusers_unet(unet: UNetModel, dirpath: str | Path, sample_size: int = 64) -> Path:
    """Export an ldmlab `UNetModel` as a diffusers `UNet2DConditionModel` directory."""
    config = dict(unet.config)
    sd = unet_ldmlab_to_diffusers(unet.state_dict(), config)
    return write_diffusers_dir(sd, diffusers_unet_config(config, sample_size), dirpath)


def save_diffusers_vae(
    vae: AutoencoderKL, dirpath: str | Path, scaling_factor: float = SD_VAE_SCALING_FACTOR
) -> Path:
    """Export an ldmlab `AutoencoderKL` as a diffusers `AutoencoderKL` directory."""
    config = dict(vae.config)
    sd = vae_ldmlab_to_diffusers(vae.state_dict())
    return write_diffusers_dir(sd, diffusers_vae_config(config, scaling_factor), dirpath)
