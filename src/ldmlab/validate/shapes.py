"""Network geometry vs data: channel multipliers, attention levels, GroupNorm groups, heads, latent channels.

Mirrors what the U-Net and VAE constructors (and their forward passes) would reject, but from the config,
before any weights or data are touched; each message names the config field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldmlab.validate.fields import get, image_size, target


def _positive_ints(values: Any) -> bool:
    return isinstance(values, Sequence) and bool(values) and all(isinstance(v, int) and v > 0 for v in values)


def level_problems(prefix: str, mult_key: str, mult: Any, attn_key: str, attn: Any) -> list[str]:
    """channel multipliers are a non-empty list of positive integers; attention levels index them."""
    if not _positive_ints(list(mult or [])):
        return [f"{prefix}.{mult_key}={mult} must be a non-empty list of positive integers, e.g. [1,2,4,4]"]
    return [f"{prefix}.{attn_key}={list(attn)} contains {level}, but {prefix}.{mult_key} has only "
            f"{len(mult)} levels: use level indices 0..{len(mult) - 1}"
            for level in attn or [] if not isinstance(level, int) or not 0 <= level < len(mult)]


def group_problems(prefix: str, groups: Any, widths: list[int], base: str) -> list[str]:
    """GroupNorm needs every channel count divisible by the number of groups (`base` names the width knob)."""
    if not isinstance(groups, int) or groups < 1:
        return [f"{prefix}.norm_groups={groups} must be a positive integer, e.g. 32"]
    bad = sorted({w for w in widths if w % groups})
    if not bad:
        return []
    common = math.gcd(*widths)
    hint = max(d for d in range(1, min(common, 32) + 1) if common % d == 0)
    line = (f"{prefix}.norm_groups={groups} does not divide the channel counts {bad} ({base} x channel_mult): "
            f"GroupNorm needs equal groups; set {prefix}.norm_groups={hint} or {prefix}.{base} to a multiple "
            f"of {groups}")
    return [line]


def head_problems(prefix: str, unet: DictConfig, widths: dict[int, int]) -> list[str]:
    """Every attention width (level -> width) splits into num_heads heads, or into head_dim-wide ones."""
    head_dim, heads = unet.get("head_dim"), unet.get("num_heads", 8)
    key, size = ("head_dim", head_dim) if head_dim else ("num_heads", heads)
    if not isinstance(size, int) or size < 1:
        return [f"{prefix}.{key}={size} must be a positive integer, e.g. {prefix}.{key}=8"]
    bad = {level: w for level, w in widths.items() if w % size}
    if not bad:
        return []
    common = math.gcd(*widths.values())
    line = (f"{prefix}.{key}={size} does not divide the attention widths {sorted(set(bad.values()))} "
            f"(model_channels x channel_mult at levels {sorted(bad)}; the middle block runs at the deepest): "
            f"set {prefix}.{key} to a divisor of {common}, e.g. {math.gcd(common, 8)}")
    return [line]


def resolution_problems(prefix: str, levels: int, size: int | None, what: str, fix: str) -> list[str]:
    """Each level after the first halves H and W: the size must divide by 2^(levels-1) (and stay >= 1)."""
    factor = 2 ** (levels - 1)
    if size is None or (size % factor == 0 and size >= factor):
        return []
    line = (f"{prefix}.channel_mult has {levels} levels, which halve H and W {levels - 1} times, but {what} "
            f"is {size}, not a multiple of {factor}: {fix}")
    return [line]


def unet_problems(cfg: DictConfig, latent: int | None = None, what: str = "the latent side") -> list[str]:
    """model.unet: levels, attention levels, GroupNorm groups, heads, and levels vs the latent resolution."""
    unet = get(cfg, "model.unet")
    if not isinstance(unet, DictConfig) or "channel_mult" not in unet:
        return []
    mult, attn, ch = unet.channel_mult, list(unet.get("attention_levels") or []), unet.model_channels
    problems = level_problems("model.unet", "channel_mult", mult, "attention_levels", attn)
    if not _positive_ints(list(mult or [])) or not isinstance(ch, int):
        return problems
    attn = [a for a in attn if isinstance(a, int) and 0 <= a < len(mult)]  # bad indices are reported above
    problems += group_problems("model.unet", unet.get("norm_groups", 32), [ch, *(ch * m for m in mult)],
                               "model_channels")
    # the middle block's transformer runs at the deepest width, attention level or not (as in SD)
    problems += head_problems("model.unet", unet, {i: ch * mult[i] for i in sorted({*attn, len(mult) - 1})})
    return problems + resolution_problems("model.unet", len(mult), latent, what,
                                          "change the image size so the latent side is a multiple of "
                                          f"{2 ** (len(mult) - 1)}, or use fewer levels")


def vae_problems(cfg: DictConfig) -> list[str]:
    """model.autoencoder (VAE training): levels, attention levels, GroupNorm groups, levels vs image size."""
    ae = get(cfg, "model.autoencoder")
    if not isinstance(ae, DictConfig) or "channel_mult" not in ae:
        return []
    prefix, mult, base = "model.autoencoder", ae.channel_mult, ae.base_channels
    problems = level_problems(prefix, "channel_mult", mult, "attn_levels", list(ae.get("attn_levels") or []))
    if not _positive_ints(list(mult or [])) or not isinstance(base, int):
        return problems
    size, field = image_size(cfg)
    return (problems + group_problems(prefix, ae.get("norm_groups", 32), [base, *(base * m for m in mult)],
                                      "base_channels")
            + resolution_problems(prefix, len(mult), size, field,
                                  f"set {field} to a multiple of {2 ** (len(mult) - 1)}, or use fewer levels"))


# ---------------------------------------------------------------- the LDM's VAE and latents


def vae_file_config(path: Path) -> dict[str, Any] | None:
    """{"channel_mult", "embed_dim", ...} of the VAE in a file or diffusers dir, from metadata or tensor shapes."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None  # load_vae says what a diffusers directory needs
        conf = json.loads((path / "config.json").read_text())
        conf = conf.get("_ldmlab_config", conf)  # exact when ldmlab wrote the directory
        return {"channel_mult": conf.get("channel_mult", conf.get("block_out_channels")),
                "embed_dim": conf.get("embed_dim", conf.get("latent_channels", 4))}
    config, shapes = _safetensors_header(path) if path.suffix == ".safetensors" else _pickle_header(path)
    return config or _config_from_shapes(shapes)


def _safetensors_header(path: Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """(ldmlab config from the metadata, tensor shapes) of a safetensors file: its header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") == "ldmlab.vae" and "config" in meta:
            return json.loads(meta["config"]), {}
        return None, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  # not iterable


def _pickle_header(path: Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """(VAEModule checkpoint's autoencoder_config, tensor shapes): a weights-only, memory-mapped load."""
    from ldmlab.nn.safe_load import load_weights_only

    raw = load_weights_only(path, mmap=True)  # refuses pickled code; tensor data stays on disk
    if not isinstance(raw, dict):
        return None, {}
    if isinstance(raw.get("autoencoder_config"), dict):
        return raw["autoencoder_config"], {}
    return None, {k: tuple(v.shape) for k, v in raw.get("state_dict", raw).items() if hasattr(v, "shape")}


def _config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """Levels and latent channels of SD/ldmlab/diffusers-named VAE weights (None when they are not a VAE)."""
    from ldmlab.convert.load import LIT_VAE_PREFIX, SD_VAE_PREFIX

    for prefix in (LIT_VAE_PREFIX, SD_VAE_PREFIX):
        if any(k.startswith(prefix) for k in shapes):
            shapes = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    levels = {k.split(".")[2] for k in shapes if k.startswith(("encoder.down.", "encoder.down_blocks."))}
    if "post_quant_conv.weight" not in shapes or not levels:
        return None
    return {"channel_mult": [1] * len(levels), "embed_dim": shapes["post_quant_conv.weight"][1]}


def ldm_vae(cfg: DictConfig) -> tuple[dict[str, Any] | None, str]:
    """The LDM's VAE architecture (inline config, or read off model.vae.path) and how to name it."""
    vae = get(cfg, "model.vae")
    if not isinstance(vae, DictConfig):
        return None, ""
    if "channel_mult" in vae:
        return dict(OmegaConf.to_container(vae)), "model.vae"  # type: ignore[arg-type]  # a mapping node
    path = get(cfg, "model.vae.path")
    if path is None or not Path(path).exists():
        return None, ""  # weight_problems reports it
    return vae_file_config(Path(path)), f"the VAE at model.vae.path={path}"


def latent_manifest(cfg: DictConfig) -> list[int] | None:
    """[C, h, w] of a latent cache (data=wds_latents data.root=...), from its manifest.json."""
    root = get(cfg, "data.root")
    if not target(cfg, "data").endswith("LatentDataModule") or root is None:
        return None
    manifest = Path(root) / "manifest.json"
    return json.loads(manifest.read_text()).get("latent_shape") if manifest.is_file() else None


def latent_problems(cfg: DictConfig) -> list[str]:
    """U-Net channels vs the VAE's latent channels, U-Net levels vs the latent side."""
    unet = get(cfg, "model.unet")
    if not isinstance(unet, DictConfig) or "channel_mult" not in unet:
        return []
    try:
        vae, source = ldm_vae(cfg)
    except Exception as error:  # noqa: BLE001  # unsafe or unreadable file: one line, before the run
        return [f"model.vae.path: {str(error).splitlines()[0]}", *unet_problems(cfg)]
    shape = latent_manifest(cfg)
    z = shape[0] if shape else vae and vae.get("embed_dim")
    source = f"the latent cache data.root={get(cfg, 'data.root')}" if shape else source
    problems = [f"model.unet.{key}={unet.get(key)} but {source} has {z}-channel latents: set "
                f"model.unet.in_channels={z} model.unet.out_channels={z}"
                for key in ("in_channels", "out_channels") if z and unet.get(key) != z]
    if shape:
        return problems + unet_problems(cfg, shape[-1], f"the cached latent side ({source})")
    return problems + _image_to_latent_problems(cfg, vae, source)


def _image_to_latent_problems(cfg: DictConfig, vae: dict[str, Any] | None, source: str) -> list[str]:
    """The image side divides by the VAE's factor, and the latent side by the U-Net's."""
    size, field = image_size(cfg)
    if not vae or not vae.get("channel_mult") or not isinstance(size, int):
        return unet_problems(cfg)
    factor = 2 ** (len(vae["channel_mult"]) - 1)
    if size % factor:
        line = (f"{field}={size} is not a multiple of {factor}, the downsampling factor of {source}: "
                f"set {field} to a multiple of {factor}")
        return [line, *unet_problems(cfg)]
    return unet_problems(cfg, size // factor, f"the latent side ({field}={size} / VAE factor {factor})")
