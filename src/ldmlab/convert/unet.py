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
- ADM's residual resampling (`resblock_updown`): the Downsample/Upsample entry is a ResBlock <->
  `downsamplers.0` / `upsamplers.0` as a ResnetBlock2D (diffusers' ResnetDownsampleBlock2D / -UpsampleBlock2D);
  per-level `num_res_blocks` shift the indices as diffusers' per-level `layers_per_block` does;
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

from ldmlab.convert.unet_config import (
    DIFFUSERS_VERSION,
    diffusers_unet_config,
    infer_unet_config,
    ldmlab_unet_config,
    upgrade_unet_config,
)
from ldmlab.nn.unet import blocks_per_level

__all__ = ["DIFFUSERS_VERSION", "diffusers_unet_config", "infer_unet_config", "ldmlab_unet_config",
           "unet_diffusers_to_ldmlab", "unet_ldmlab_to_diffusers", "unet_module_diffusers_to_ldmlab",
           "unet_module_ldmlab_to_diffusers", "upgrade_unet_config"]

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


def _resampler(ours: str, theirs: str, updown: bool) -> tuple[str, str, str]:
    """A Downsample/Upsample (`op` / `conv` <-> `conv`), or ADM's resampling ResBlock (a ResnetBlock2D)."""
    if updown:
        return ours, theirs, "res"
    return f"{ours}.{'op' if 'downsamplers' in theirs else 'conv'}", f"{theirs}.conv", "same"


def _block_prefixes(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(ldmlab prefix, diffusers prefix, kind) for every module; kind is 'res', 'attn' or 'same'."""
    levels, attn = len(config["channel_mult"]), set(config["attention_levels"])
    ns, updown = blocks_per_level(config["num_res_blocks"], levels), config.get("resblock_updown", False)
    pairs, i = [(a, b, "same") for a, b in _TOP_LEVEL], 1
    for level in range(levels):
        for j in range(ns[level]):
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if level in attn:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            i += 1
        if level != levels - 1:
            pairs.append(_resampler(f"input_blocks.{i}.0", f"down_blocks.{level}.downsamplers.0", updown))
            i += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attn"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    k = 0
    for b in range(levels):  # diffusers up_blocks[b] is level levels-1-b, with n + 1 resnets
        level = levels - 1 - b
        for j in range(ns[level] + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", "res"))
            if level in attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}", "attn"))
            if j == ns[level] and level:
                index = 2 if level in attn else 1
                pairs.append(_resampler(f"output_blocks.{k}.{index}", f"up_blocks.{b}.upsamplers.0", updown))
            k += 1
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
