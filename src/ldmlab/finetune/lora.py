"""LoRA adapters injected by module-name pattern around frozen base layers (Hu et al. 2021, arXiv:2106.09685).

W' = W + (alpha / r) * B @ A with A Kaiming-uniform and B zero, so step 0 is the base model exactly. Each
adapter is a `LoRA` child named `lora` of its nn.Linear / nn.Conv2d, applied by a forward hook: the base
module keeps its class and its state-dict keys (a base checkpoint loads as before), and the adapter's keys
are `<module>.lora.A.weight`, `<module>.lora.B.weight`, `<module>.lora.alpha`. Own code instead of `peft`:
peft's wrappers rename the base keys (`base_layer.weight`) and it checks neither rank nor empty matches in
our one-line style; this file is the whole mechanism. Exports to PEFT/diffusers and kohya names: lora_formats.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

# qualified-name regexes (re.fullmatch) of ldmlab's UNetModel (nn/attention.py, nn/unet_blocks.py)
ATTENTION = (r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",)
FEED_FORWARD = (r".*\.ff\.net\.(0\.proj|2)",)
CONVOLUTIONS = (r".*\.(in_layers\.2|out_layers\.3|skip_connection|op|conv|proj_in|proj_out)",)
TEXT_ENCODER = (r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",)  # transformers' CLIPTextModel
DEFAULT_UNET_TARGETS = ATTENTION
PRESETS = {"attention": ATTENTION, "feed_forward": FEED_FORWARD, "conv": CONVOLUTIONS, "text_encoder": TEXT_ENCODER}


class LoRA(nn.Module):
    """Low-rank update of one Linear or Conv2d: A has the base's kernel, B is a 1x1 map (as PEFT and kohya)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.A = nn.Linear(base.in_features, rank, bias=False)
            self.B = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                               base.dilation, bias=False)
            self.B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        nn.init.zeros_(self.B.weight)
        self.A.to(base.weight), self.B.to(base.weight)
        # on the base's device: a CPU scalar in a CUDA model makes inductor skip CUDA graphs (reduce-overhead)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=base.weight.device))
        self.rank, self.scale, self.merged = rank, 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """The update (alpha/r) * scale * B(A(dropout(x))), same shape as the base output."""
        return self.B(self.A(self.dropout(x))) * (self.alpha * (self.scale / self.rank))

    def delta_weight(self) -> Tensor:
        """(alpha/r) * scale * B @ A in the base weight's shape (out, in) or (out, in, kh, kw)."""
        a, b = self.A.weight, self.B.weight
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        return delta * (self.alpha * (self.scale / self.rank))


def _hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """Forward hook on the base layer: add the adapter's update unless merged or scaled to 0."""
    lora: LoRA = module.lora
    if lora.merged or lora.scale == 0:
        return output
    return output + lora(args[0])


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRA]]:
    """(base module name, adapter) for every adapter in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRA):
            yield name.removesuffix(".lora").removesuffix("lora"), module


def _check_rank(name: str, module: nn.Module, rank: int) -> None:
    """One line when `rank` is not in 1 .. min(out, in * kernel) of this layer."""
    w = module.weight
    limit = min(w.shape[0], w[0].numel())
    if not 0 < rank <= limit:
        raise ValueError(f"LoRA rank {rank} is outside 1..{limit} for '{name}' (weight {tuple(w.shape)})")


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = DEFAULT_UNET_TARGETS) -> list[str]:
    """Freeze `model` and add adapters to Linear/Conv2d modules whose names fullmatch a `targets` regex."""
    candidates = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    candidates = {n: m for n, m in candidates.items()  # not adapters themselves, nor layers already adapted
                  if not re.search(r"(^|\.)lora\.[AB]$", n) and not isinstance(getattr(m, "lora", None), LoRA)}
    names = [n for n in candidates if any(re.fullmatch(p, n) for p in targets)]
    if not names:
        ends = sorted({".".join(re.sub(r"\d+", "N", n).split(".")[-3:]) for n in candidates})  # N: any index
        raise ValueError(f"LoRA targets {list(targets)} match no Linear/Conv2d module; candidate names end in: "
                         f"{', '.join(ends[:16])}{', ...' if len(ends) > 16 else ''} (N: any index)")
    for name in names:
        _check_rank(name, candidates[name], rank)
    for name in names:
        module = candidates[name]
        module.lora = LoRA(module, rank, alpha, dropout)
        module.register_forward_hook(_hook)
    model.requires_grad_(False)
    for _, lora in lora_modules(model):  # also those of earlier calls
        lora.requires_grad_(True)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable tensors (what goes into the optimizer and the EMA)."""
    return [p for _, lora in lora_modules(model) for p in lora.parameters()]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapters only: `<module>.lora.{A.weight, B.weight, alpha}` (no base weights)."""
    return {k: v for k, v in model.state_dict().items() if re.search(r"(^|\.)lora\.(A\.weight|B\.weight|alpha)$", k)}


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base weights only, under their own names (what the base checkpoint and its exporters take)."""
    return {k: v for k, v in model.state_dict().items() if not re.search(r"(^|\.)lora\.(A|B|alpha)", k)}


def load_lora(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter tensors strictly: one line on missing/unexpected keys or a shape mismatch."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA file made for another architecture: {len(missing)} missing keys "
                         f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    bad = [k for k, v in own.items() if v.shape != state[k].shape]
    if bad:
        raise ValueError(f"LoRA file made for another architecture: '{bad[0]}' has shape "
                         f"{tuple(state[bad[0]].shape)}, this model {tuple(own[bad[0]].shape)}")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Add each update into its base weight (inference without the extra matmuls)."""
    for name, lora in lora_modules(model):
        if not lora.merged:
            base = model.get_submodule(name)
            base.weight += lora.delta_weight().to(base.weight.dtype)
            lora.merged = True


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> None:
    """Subtract merged updates again (the base weights return within floating-point rounding)."""
    for name, lora in lora_modules(model):
        if lora.merged:
            base = model.get_submodule(name)
            base.weight -= lora.delta_weight().to(base.weight.dtype)
            lora.merged = False


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every update by `scale` (0: the base model; 1: as trained); merged adapters refuse."""
    if any(lora.merged for _, lora in lora_modules(model)):
        raise ValueError("set_lora_scale on merged LoRA weights: call unmerge_lora first")
    for _, lora in lora_modules(model):
        lora.scale = float(scale)
