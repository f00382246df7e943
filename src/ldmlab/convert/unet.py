"""State-dict and config mapping between diffusers `UNet2DConditionModel` and ldmlab's (= SD-original) U-Net.

Differences handled (cf. diffusers' `convert_ldm_unet_checkpoint` in `loaders/single_file_utils.py`):
- blocks: `input_blocks.{1 + l(n+1) + j}.0/1` <-> `down_blocks.l.resnets/attentions.j`,
  `input_blocks.{l(n+1) + n + 1}.0.op` <-> `down_blocks.l.downsamplers.0.conv`, `middle_block.0/1/2` <->
  `mid_block.resnets.0 / attentions.0 / resnets.1`, `output_blocks.{b(n+1) + j}` <-> `up_blocks.b` (deepest
  first) with the Upsample at index 1 or 2 <-> `upsamplers.0.conv`;
- res blocks: `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection` <-> `norm1`, `conv1`,
  `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`; transformer internals have the same names on both sides;
- `time_embed.0/2`, `label_emb`, `input_blocks.0.0`, `out.0/2` <-> `time_embedding.linear_1/2`,
  `class_embedding`, `conv_in`, `conv_norm_out`, `conv_out`; a super-resolution U-Net's noise-level embedding
  `level_embed.0/2` <-> `class_embedding.linear_1/2` of `class_embed_type="timestep"`;
- image-conditioned U-Nets (SD-inpainting's 9 input channels) differ only in `in_channels`: nothing to rename;
- self-attention-only U-Nets (context_dim None) have no `attn2`/`norm2`; diffusers' UNet2DConditionModel
  always builds them, so the export adds an `attn2` with all-zero weights (it adds exactly 0) and per-level
  `cross_attention_dim` = the block width, which keeps `encoder_hidden_states=None` valid in diffusers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

# SD-original ResBlock leaf -> diffusers ResnetBlock2D leaf
_RES_TO_DIFF = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RES_TO_LDM = {v: k for k, v in _RES_TO_DIFF.items()}
_TOP_LEVEL = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb", "class_embedding"),
    ("level_embed.0", "class_embedding.linear_1"),  # noise_level_embed: diffusers' class_embed_type="timestep"
    ("level_embed.2", "class_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
]
_ZERO_ATTN2 = re.compile(r"\.transformer_blocks\.\d+\.(attn2|norm2)\.")
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout is tested against


def _block_prefixes(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(ldmlab prefix, diffusers prefix, kind) for every module; kind is 'res', 'attn' or 'same'."""
    n, levels, attn = config["num_res_blocks"], len(config["channel_mult"]), set(config["attention_levels"])
    pairs = [(a, b, "same") for a, b in _TOP_LEVEL]
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if level in attn:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
        if level != levels - 1:
            i = 1 + level * (n + 1) + n
            pairs.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "same"))
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    for b in range(levels):  # diffusers up_blocks[b] is level levels-1-b
        has_attn = levels - 1 - b in attn
        for j in range(n + 1):
            k = b * (n + 1) + j
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", "res"))
            if has_attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}", "attn"))
            if j == n and b != levels - 1:
                pairs.append(
                    (
                        f"output_blocks.{k}.{2 if has_attn else 1}.conv",
                        f"up_blocks.{b}.upsamplers.0.conv",
                        "same",
                    )
                )
    return pairs


def _translate(key: str, table: dict[str, tuple[str, str]], leaves: dict[str, str], side: str) -> str:
    """Rename one key through the longest module prefix found in `table` and the res-block leaf map."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            target, kind = table[prefix]
            rest = ".".join(parts[cut:])
            if kind == "res":
                module, _, param = rest.rpartition(".")
                if module not in leaves:
                    break
                rest = f"{leaves[module]}.{param}"
            return f"{target}.{rest}"
    raise ValueError(
        f"unexpected key '{key}' in a {side} U-Net state dict for this config: strip any prefix "
        "(e.g. SD's 'model.diffusion_model.') first and check the config matches the weights"
    )


def _add_zero_cross_attention(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Give each self-attention transformer block an attn2/norm2 that adds exactly 0 (diffusers needs it)."""
    out = dict(sd)
    for key, q in sd.items():
        if not key.endswith(".attn1.to_q.weight"):
            continue
        block, (inner, dim) = key[: -len(".attn1.to_q.weight")], q.shape
        zeros = {
            "to_q.weight": (inner, dim),
            "to_k.weight": (inner, dim),
            "to_v.weight": (inner, dim),
            "to_out.0.weight": (dim, inner),
            "to_out.0.bias": (dim,),
        }
        out.update({f"{block}.attn2.{k}": q.new_zeros(shape) for k, shape in zeros.items()})
        out[f"{block}.norm2.weight"], out[f"{block}.norm2.bias"] = q.new_ones(dim), q.new_zeros(dim)
    return out


def _drop_zero_cross_attention(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the all-zero attn2/norm2 of a self-attention-only export; refuse real cross-attention weights."""
    for key, value in sd.items():
        if ".attn2.to_out.0." in key and torch.count_nonzero(value) > 0:
            raise ValueError(
                f"'{key}' is non-zero but config context_dim=None: these weights use "
                "cross-attention, set context_dim to the diffusers cross_attention_dim"
            )
    return {k: v for k, v in sd.items() if not _ZERO_ATTN2.search(k)}


def unet_ldmlab_to_diffusers(sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Map an ldmlab / SD-original U-Net state dict (of a model with `config`) to diffusers names."""
    table = {ours: (theirs, kind) for ours, theirs, kind in _block_prefixes(config)}
    out = {_translate(k, table, _RES_TO_DIFF, "ldmlab"): v for k, v in sd.items()}
    return _add_zero_cross_attention(out) if config["context_dim"] is None else out


def unet_diffusers_to_ldmlab(sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Map a diffusers `UNet2DConditionModel` state dict to ldmlab / SD-original names (ldmlab `config`)."""
    if config["context_dim"] is None:
        sd = _drop_zero_cross_attention(sd)
    table = {theirs: (ours, kind) for ours, theirs, kind in _block_prefixes(config)}
    return {_translate(k, table, _RES_TO_LDM, "diffusers"): v for k, v in sd.items()}


def unet_module_ldmlab_to_diffusers(name: str, config: dict[str, Any]) -> str:
    """diffusers name of one ldmlab U-Net module (e.g. a LoRA target), for a model with `config`."""
    table = {ours: (theirs, kind) for ours, theirs, kind in _block_prefixes(config)}
    return _translate(f"{name}.weight", table, _RES_TO_DIFF, "ldmlab").removesuffix(".weight")


def unet_module_diffusers_to_ldmlab(name: str, config: dict[str, Any]) -> str:
    """ldmlab name of one diffusers U-Net module, for an ldmlab model with `config`."""
    table = {theirs: (ours, kind) for ours, theirs, kind in _block_prefixes(config)}
    return _translate(f"{name}.weight", table, _RES_TO_LDM, "diffusers").removesuffix(".weight")


def _heads_per_level(config: dict[str, Any]) -> int | list[int]:
    """diffusers' `attention_head_dim`, which (for legacy reasons) holds the number of heads per level."""
    if config["head_dim"] is None:
        return config["num_heads"]
    return [max(1, config["model_channels"] * m // config["head_dim"]) for m in config["channel_mult"]]


def diffusers_unet_config(config: dict[str, Any], sample_size: int = 64) -> dict[str, Any]:
    """`UNet2DConditionModel` config (as in its config.json) of the ldmlab U-Net with `config`."""
    levels, attn = len(config["channel_mult"]), set(config["attention_levels"])
    widths = [config["model_channels"] * m for m in config["channel_mult"]]
    cross = config["context_dim"] if config["context_dim"] is not None else widths  # see module docstring
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
        "down_block_types": ["CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": [
            "CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(levels))
        ],
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
        "class_embed_type": "timestep" if levels_embed else None,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "_ldmlab_config": dict(config),  # diffusers ignores "_" keys; lets the reverse trip be exact
    }


# diffusers options outside the LDM U-Net, with the only value ldmlab can represent
_SUPPORTED_VALUES = {
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
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
    per_block = [
        k
        for k in ("layers_per_block", "transformer_layers_per_block")
        if isinstance(cfg.get(k), (list, tuple))
    ]
    if per_block:
        raise ValueError(
            f"diffusers config {per_block[0]}={cfg[per_block[0]]!r} varies per block: ldmlab's "
            "UNetModel takes one value for all levels"
        )


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
    return {"num_heads": 8, "head_dim": dims.pop()}


def ldmlab_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """ldmlab `UNetModel` arguments of a diffusers `UNet2DConditionModel` config (exact if we wrote it)."""
    if "_ldmlab_config" in cfg:
        return dict(cfg["_ldmlab_config"])
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
    return {
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": mc,
        "channel_mult": [w // mc for w in widths],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "attention_levels": attn,
        **_attention_args(cfg, widths, attn),
        "transformer_depth": cfg.get("transformer_layers_per_block", 1),
        "context_dim": _context_dim(cfg, widths),
        "num_classes": None if num_class_embeds is None else num_class_embeds - 1,
        "dropout": cfg.get("dropout", 0.0),
        "use_linear_projection": cfg.get("use_linear_projection", False),
        "norm_groups": cfg.get("norm_num_groups", 32),
        "noise_level_embed": cfg.get("class_embed_type") == "timestep",
    }


def infer_unet_config(
    sd: dict[str, Tensor], num_heads: int = 8, head_dim: int | None = None
) -> dict[str, Any]:
    """UNetModel arguments read off an SD-original-layout state dict (heads and dropout are not stored)."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in sd]
    n = downs[0] - 1 if downs else len(blocks) - 1  # res blocks before the first Downsample
    levels = len(downs) + 1
    first = [1 + level * (n + 1) for level in range(levels)]  # first res block of every level
    to_k = sd.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")  # (inner, context_dim)
    depth = {k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")}
    return {
        "in_channels": sd["input_blocks.0.0.weight"].shape[1],
        "out_channels": sd["out.2.weight"].shape[0],
        "model_channels": mc,
        "channel_mult": [sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc for i in first],
        "num_res_blocks": n,
        "attention_levels": [lv for lv, i in enumerate(first) if f"input_blocks.{i}.1.norm.weight" in sd],
        "num_heads": num_heads,
        "head_dim": head_dim,
        "transformer_depth": len(depth),
        "context_dim": None if to_k is None else to_k.shape[1],
        # ldmlab's label_emb has num_classes + 1 rows, the last being the null class
        "num_classes": sd["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in sd else None,
        "dropout": 0.0,
        "use_linear_projection": sd["middle_block.1.proj_in.weight"].ndim == 2,
        "norm_groups": 32,  # not stored in the weights; SD uses 32
        "noise_level_embed": "level_embed.0.weight" in sd,
    }
