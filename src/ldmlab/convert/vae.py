"""State-dict mapping between diffusers `AutoencoderKL` and ldmlab's (= SD-original / LDM) layout.

Differences handled (cf. diffusers' `scripts/convert_vae_pt_to_diffusers.py`):
- paths: `down_blocks.i.resnets.j` <-> `down.i.block.j`, `mid_block.resnets.0/1` <-> `mid.block_1/2`, ...;
- diffusers' decoder `up_blocks.k` runs deepest-first; LDM's `up.i` is indexed like the encoder: i = n-1-k;
- attention: diffusers Linear `to_q/to_k/to_v/to_out.0` (C, C) (older diffusers: `query/key/value/proj_attn`)
  <-> LDM 1x1 convs `q/k/v/proj_out` (C, C, 1, 1); `group_norm` <-> `norm`;
- `conv_shortcut` <-> `nin_shortcut`, `conv_norm_out` <-> `norm_out`.
"""

from __future__ import annotations

import re

from torch import Tensor

_DIFF_LEVEL = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$"
)
_DIFF_RESAMPLE = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.(.+)$"
)
_DIFF_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)$")
_LDM_LEVEL = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)$")
_LDM_RESAMPLE = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.(downsample|upsample)\.(.+)$")
_LDM_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")
_SAME = re.compile(r"^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)$")

# attention leaf module names: diffusers (current and pre-0.14) -> LDM
_ATTN_TO_LDM = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_ATTN_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_PROJECTIONS = {"q", "k", "v", "proj_out"}


def _num_levels(keys: list[str], pattern: str) -> int:
    """Number of decoder levels, read from the largest index in keys matching `pattern` (0 if none)."""
    indices = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(indices, default=-1) + 1


def _split_leaf(rest: str) -> tuple[str, str]:
    """'to_out.0.weight' -> ('to_out.0', 'weight')."""
    module, _, param = rest.rpartition(".")
    return module, param


def _attn_to_ldm(rest: str, value: Tensor) -> tuple[str, Tensor]:
    """Rename a diffusers attention leaf and turn Linear (C, C) weights into 1x1 conv (C, C, 1, 1)."""
    module, param = _split_leaf(rest)
    if module not in _ATTN_TO_LDM:
        raise ValueError(
            f"unknown diffusers attention parameter '{rest}': expected one of {sorted(_ATTN_TO_LDM)}"
        )
    name = _ATTN_TO_LDM[module]
    if name in _PROJECTIONS and param == "weight" and value.ndim == 2:
        value = value[:, :, None, None]
    return f"{name}.{param}", value


def _attn_to_diffusers(rest: str, value: Tensor) -> tuple[str, Tensor]:
    """Rename an LDM attention leaf and turn 1x1 conv (C, C, 1, 1) weights into Linear (C, C)."""
    module, param = _split_leaf(rest)
    if module not in _ATTN_TO_DIFF:
        raise ValueError(
            f"unknown ldmlab attention parameter '{rest}': expected one of {sorted(_ATTN_TO_DIFF)}"
        )
    if module in _PROJECTIONS and param == "weight" and value.ndim == 4:
        value = value[:, :, 0, 0]
    return f"{_ATTN_TO_DIFF[module]}.{param}", value


def _resnet_to_ldm(rest: str) -> str:
    """diffusers ResnetBlock2D leaf -> LDM ResnetBlock leaf."""
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def _resnet_to_diffusers(rest: str) -> str:
    """LDM ResnetBlock leaf -> diffusers ResnetBlock2D leaf."""
    return rest.replace("nin_shortcut.", "conv_shortcut.")


def _key_to_ldm(key: str, value: Tensor, n_levels: int) -> tuple[str, Tensor]:
    """Translate one diffusers (key, tensor) into the LDM layout."""
    if _SAME.match(key):
        return key, value
    if m := _DIFF_LEVEL.match(key):
        stack, i, kind, j, rest = m.groups()
        head = f"encoder.down.{i}" if stack.startswith("encoder") else f"decoder.up.{n_levels - 1 - int(i)}"
        if kind == "resnets":
            return f"{head}.block.{j}.{_resnet_to_ldm(rest)}", value
        leaf, value = _attn_to_ldm(rest, value)
        return f"{head}.attn.{j}.{leaf}", value
    if m := _DIFF_RESAMPLE.match(key):
        stack, i, kind, rest = m.groups()
        if stack.startswith("encoder"):
            return f"encoder.down.{i}.downsample.{rest}", value
        return f"decoder.up.{n_levels - 1 - int(i)}.upsample.{rest}", value
    if m := _DIFF_MID.match(key):
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{_resnet_to_ldm(rest)}", value
        leaf, value = _attn_to_ldm(rest, value)
        return f"{part}.mid.attn_1.{leaf}", value
    if m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(weight|bias)$", key):
        return f"{m.group(1)}.norm_out.{m.group(2)}", value
    raise ValueError(
        f"unexpected key '{key}' in a diffusers AutoencoderKL state dict: strip any prefix first"
    )


def _key_to_diffusers(key: str, value: Tensor, n_levels: int) -> tuple[str, Tensor]:
    """Translate one LDM (key, tensor) into the diffusers layout."""
    if _SAME.match(key):
        return key, value
    if m := _LDM_LEVEL.match(key):
        stack, i, kind, j, rest = m.groups()
        head = (
            f"encoder.down_blocks.{i}"
            if stack == "encoder.down"
            else f"decoder.up_blocks.{n_levels - 1 - int(i)}"
        )
        if kind == "block":
            return f"{head}.resnets.{j}.{_resnet_to_diffusers(rest)}", value
        leaf, value = _attn_to_diffusers(rest, value)
        return f"{head}.attentions.{j}.{leaf}", value
    if m := _LDM_RESAMPLE.match(key):
        stack, i, kind, rest = m.groups()
        if stack == "encoder.down":
            return f"encoder.down_blocks.{i}.downsamplers.0.{rest}", value
        return f"decoder.up_blocks.{n_levels - 1 - int(i)}.upsamplers.0.{rest}", value
    if m := _LDM_MID.match(key):
        part, kind, rest = m.groups()
        if kind == "attn_1":
            leaf, value = _attn_to_diffusers(rest, value)
            return f"{part}.mid_block.attentions.0.{leaf}", value
        return f"{part}.mid_block.resnets.{int(kind[-1]) - 1}.{_resnet_to_diffusers(rest)}", value
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(weight|bias)$", key):
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}", value
    raise ValueError(
        f"unexpected key '{key}' in an ldmlab AutoencoderKL state dict: strip any prefix "
        "(e.g. SD's 'first_stage_model.') first"
    )


def diffusers_to_ldmlab(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a diffusers `AutoencoderKL` state dict to ldmlab / SD-original names and shapes."""
    n_levels = _num_levels(list(sd), r"^decoder\.up_blocks\.(\d+)\.")
    return dict(_key_to_ldm(k, v, n_levels) for k, v in sd.items())


def ldmlab_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an ldmlab / SD-original `AutoencoderKL` state dict to diffusers names and shapes."""
    n_levels = _num_levels(list(sd), r"^decoder\.up\.(\d+)\.")
    return dict(_key_to_diffusers(k, v, n_levels) for k, v in sd.items())
