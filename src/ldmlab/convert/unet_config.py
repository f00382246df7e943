"""U-Net configs across layouts: ldmlab `UNetModel` arguments <-> diffusers `UNet2DConditionModel` config.json,
the arguments read off an SD-original state dict's shapes, and older stored configs brought up to date.

diffusers' block types for the ADM options: `resnet_time_scale_shift="scale_shift"` on every block;
`resblock_updown` is `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`, which diffusers has only without
attention (its `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D` resample with a conv; `SimpleCrossAttn*` and
`Attn*` blocks use another attention layer): a U-Net with attention at a resampling level and resblock_updown
has no UNet2DConditionModel equivalent and its export is refused in one line.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import Tensor

from ldmlab.nn.unet import UNetModel

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout is tested against
DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D"}
UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D"}


def upgrade_unet_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stored UNetModel config in today's form: arguments added since it was written take their defaults (the
    architecture it was built with), and num_heads is dropped where head_dim was set (head_dim decided then)."""
    defaults = {name: p.default for name, p in inspect.signature(UNetModel).parameters.items()
                if name != "gradient_checkpointing"}
    out = {**defaults, **config}
    for key in ("channel_mult", "attention_levels"):
        out[key] = list(out[key])
    if out["head_dim"] is not None:
        out["num_heads"] = None
    return out


def _heads_per_level(config: dict[str, Any]) -> int | list[int]:
    """diffusers' `attention_head_dim`, which (for legacy reasons) holds the number of heads per level."""
    if config["head_dim"] is None:
        return config["num_heads"]
    return [max(1, config["model_channels"] * m // config["head_dim"]) for m in config["channel_mult"]]


def _block_types(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """diffusers' down_block_types and up_block_types (deepest first) for an ldmlab config."""
    levels, attn = len(config["channel_mult"]), set(config["attention_levels"])
    updown = config.get("resblock_updown", False)
    resampling_attn = sorted(attn - {levels - 1}) + sorted(attn - {0})
    if updown and resampling_attn:
        raise ValueError(
            f"resblock_updown=True with attention at level {resampling_attn[0]}, which resamples: diffusers has "
            "no cross-attention block with a residual resampler (ResnetDownsampleBlock2D/ResnetUpsampleBlock2D have "
            "no attention): keep such a model in the ldmlab or SD layout"
        )
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D",
                                                                                                "UpBlock2D")
    down = ["CrossAttnDownBlock2D" if i in attn else plain_down for i in range(levels)]
    up = ["CrossAttnUpBlock2D" if i in attn else plain_up for i in reversed(range(levels))]
    return down, up


def diffusers_unet_config(config: dict[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """`UNet2DConditionModel` config (as in its config.json) of the ldmlab U-Net with `config`."""
    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    cross = config["context_dim"] if config["context_dim"] is not None else widths  # see convert/unet.py
    down, up = _block_types(config)
    levels_embed = bool(config.get("noise_level_embed"))
    if levels_embed and config["num_classes"] is not None:
        raise ValueError("a U-Net with num_classes and noise_level_embed has two class embeddings; diffusers' "
                         "UNet2DConditionModel has one: export a model with only one of them")
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "only_cross_attention": False,
        "block_out_channels": widths,
        "layers_per_block": config["num_res_blocks"],
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": config["dropout"],
        "act_fn": "silu",
        "norm_num_groups": config["norm_groups"],
        "norm_eps": 1e-5,
        "cross_attention_dim": cross,
        "transformer_layers_per_block": config["transformer_depth"],
        "attention_head_dim": _heads_per_level(config),
        "use_linear_projection": config["use_linear_projection"],
        "num_class_embeds": None if config["num_classes"] is None else config["num_classes"] + 1,
        "class_embed_type": "timestep" if levels_embed else None,  # SR's noise-level embedding
        "upcast_attention": False,
        "resnet_time_scale_shift": config.get("resnet_time_scale_shift", "default"),
        "time_embedding_type": "positional",
        "_ldmlab_config": dict(config),  # diffusers ignores "_" keys; lets the reverse trip be exact
    }


# diffusers options outside the LDM U-Net, with the only value ldmlab can represent
_SUPPORTED_VALUES = {
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "encoder_hid_dim_type": None,
}


def _check_diffusers_config(cfg: dict[str, Any]) -> None:
    """Reject diffusers U-Net features that the LDM U-Net does not have."""
    if cfg.get("class_embed_type") not in (None, "timestep"):  # "timestep": ldmlab's noise_level_embed
        raise ValueError(f"diffusers config class_embed_type={cfg['class_embed_type']!r} has no ldmlab UNetModel "
                         "equivalent (supported: None, 'timestep'): convert SD1.x/2.x-style U-Nets only")
    for key, expected in _SUPPORTED_VALUES.items():
        if cfg.get(key, expected) != expected:
            raise ValueError(
                f"diffusers config {key}={cfg[key]!r} has no ldmlab UNetModel equivalent "
                f"(supported: {expected!r}): convert SD1.x/2.x-style U-Nets only"
            )
    shift = cfg.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(f"diffusers config resnet_time_scale_shift={shift!r} has no ldmlab UNetModel equivalent "
                         "(supported: 'default', 'scale_shift')")
    varies = isinstance(cfg.get("transformer_layers_per_block"), (list, tuple))
    if varies:
        raise ValueError(
            f"diffusers config transformer_layers_per_block={cfg['transformer_layers_per_block']!r} varies per "
            "block: ldmlab's UNetModel takes one value for all levels"
        )
    for key, known in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
        unknown = [t for t in cfg[key] if t not in known]
        if unknown:
            raise ValueError(f"diffusers config {key} has {unknown[0]}: ldmlab's UNetModel has {', '.join(sorted(known))}")


def _resblock_updown(cfg: dict[str, Any]) -> bool:
    """Whether the diffusers blocks resample with residual blocks (all of them, or none)."""
    plain = [t for t in (*cfg["down_block_types"], *cfg["up_block_types"]) if not t.startswith("CrossAttn")]
    kinds = {t.startswith("Resnet") for t in plain}
    if len(kinds) > 1:
        raise ValueError(f"diffusers config mixes residual and conv resampling blocks ({plain}): ldmlab's "
                         "resblock_updown is one switch for all levels")
    return kinds == {True}


def _context_dim(cfg: dict[str, Any], widths: list[int]) -> int | None:
    """ldmlab context_dim; a per-level cross_attention_dim equal to the widths marks self-attention only."""
    cross = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross, int):
        return cross
    if list(cross) == widths:
        return None
    raise ValueError(
        f"diffusers config cross_attention_dim={cross!r} varies per block: ldmlab's "
        "UNetModel takes one context_dim for all levels"
    )


def _attention_args(cfg: dict[str, Any], widths: list[int], attn: list[int]) -> dict[str, Any]:
    """num_heads / head_dim from diffusers' per-level head counts (legacy name attention_head_dim)."""
    heads = cfg.get("attention_head_dim", 8)
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    used = [heads[i] for i in {*attn, len(widths) - 1}]
    if len(set(used)) == 1:
        return {"num_heads": used[0], "head_dim": None}
    dims = {widths[i] // heads[i] for i in {*attn, len(widths) - 1}}
    if len(dims) != 1:
        raise ValueError(
            f"diffusers attention_head_dim={heads} gives neither a constant head count nor a "
            "constant head width: not expressible as ldmlab num_heads or head_dim"
        )
    return {"num_heads": None, "head_dim": dims.pop()}


def ldmlab_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """ldmlab `UNetModel` arguments of a diffusers `UNet2DConditionModel` config (exact if we wrote it)."""
    if "_ldmlab_config" in cfg:
        return upgrade_unet_config(cfg["_ldmlab_config"])
    _check_diffusers_config(cfg)
    widths = list(cfg["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(
            f"diffusers block_out_channels={widths} are not multiples of the first: "
            "ldmlab needs model_channels * integer channel_mult"
        )
    attn = [i for i, kind in enumerate(cfg["down_block_types"]) if "CrossAttn" in kind]
    # with class_embed_type="timestep" diffusers ignores num_class_embeds (its class embedding is an MLP)
    num_class_embeds = cfg.get("num_class_embeds") if cfg.get("class_embed_type") is None else None
    layers = cfg.get("layers_per_block", 2)
    return {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": mc,
        "channel_mult": [w // mc for w in widths],
        "num_res_blocks": layers if isinstance(layers, int) else list(layers),
        "attention_levels": attn,
        **_attention_args(cfg, widths, attn),
        "transformer_depth": cfg.get("transformer_layers_per_block", 1),
        "context_dim": _context_dim(cfg, widths),
        "num_classes": None if num_class_embeds is None else num_class_embeds - 1,
        "dropout": cfg.get("dropout", 0.0),
        "use_linear_projection": cfg.get("use_linear_projection", False),
        "norm_groups": cfg.get("norm_num_groups", 32),
        "resnet_time_scale_shift": cfg.get("resnet_time_scale_shift", "default"),
        "resblock_updown": _resblock_updown(cfg),
        "noise_level_embed": cfg.get("class_embed_type") == "timestep",
    }


def _output_levels(sd: dict[str, Tensor]) -> tuple[list[int], bool]:
    """(output blocks per level, deepest first; whether the upsamplers are residual blocks) from the keys: a level
    but the shallowest ends in a block with an upsampler at sub-index 1 or 2 (LDM `conv`, ADM `in_layers`)."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.", k))})
    ups = {int(m.group(1)): m.group(2) for k in sd if (m := re.match(r"output_blocks\.(\d+)\.[12]\.(conv|in_layers)\.", k))}
    counts: list[int] = []
    run = 0
    for k in blocks:
        run += 1
        if k in ups:
            counts, run = [*counts, run], 0
    return [*counts, run], "in_layers" in ups.values()


def infer_unet_config(
    sd: dict[str, Tensor], num_heads: int | None = 8, head_dim: int | None = None
) -> dict[str, Any]:
    """UNetModel arguments read off an SD-original-layout state dict (heads and dropout are not stored)."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    per_level, updown = _output_levels(sd)
    n = [c - 1 for c in reversed(per_level)]  # an output level has one block more than its input level
    first = [1 + sum(n[:level]) + level for level in range(len(n))]  # first res block of every level
    to_k = sd.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")  # (inner, context_dim)
    depth = {k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")}
    emb_out, out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0], sd["input_blocks.1.0.out_layers.3.weight"]
    return {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "model_channels": mc,
        "channel_mult": [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first],
        "num_res_blocks": n[0] if len(set(n)) == 1 else n,
        "attention_levels": [lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.norm.weight" in sd],
        "num_heads": None if head_dim is not None else num_heads,
        "head_dim": head_dim,
        "transformer_depth": len(depth),
        "context_dim": None if to_k is None else to_k.shape[1],
        # ldmlab's label_emb has num_classes + 1 rows, the last being the null class
        "num_classes": sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else None,
        "dropout": 0.0,
        "use_linear_projection": sd["middle_block.1.proj_in.weight"].ndim == 2,
        "norm_groups": 32,  # not stored in the weights; SD uses 32
        "resnet_time_scale_shift": "scale_shift" if emb_out == 2 * out.shape[0] else "default",
        "resblock_updown": updown,
        "noise_level_embed": "level_embed.0.weight" in sd,
    }

