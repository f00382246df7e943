"""GPU speed switches shared by the training path (callbacks.speed.GPUSpeed) and the benchmark (bench.gpu).

- channels_last: cuDNN's convolutions and the compiler's GroupNorm+SiLU kernels run on NHWC without the
  NCHW↔NHWC transposes an NCHW model pays around every conv on tensor cores.
- regional compilation: `torch.compile` of every block a model lists in `_repeated_blocks` (U-Net: ResBlock,
  SpatialTransformer; VAE: ResnetBlock, AttnBlock), in place, so state-dict names do not change. Blocks of one
  shape share a compiled graph, and each graph is small: warm-up is a fraction of a whole-model compile
  (diffusers' `compile_repeated_blocks` follows the same idea), the speed is close to it.
- SDPA backend order: which fused attention kernel `scaled_dot_product_attention` tries first.
- inductor settings: `torch._inductor.config` names (1x1 convs as matmuls, coordinate-descent tuning, ...).
- matmul weights in bf16 for inference under autocast: the casts autocast would repeat on every call, done once.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

CompileScope = Literal["none", "regional", "full"]
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}

# torch._inductor settings the benchmarks try by name (variant features c1x1, cdt, freeze, mag): 1x1 convs (SD's
# proj_in/proj_out, ResBlock skips) lowered as matmuls; coordinate-descent tuning of the generated kernels'
# launch configs (a longer compile); freezing, inference only: weights folded in as constants; GEMMs and convs
# autotuned, Triton templates (which can take the following pointwise ops as epilogues) against cuBLAS/cuDNN
INDUCTOR_FEATURES: dict[str, dict[str, Any]] = {
    "c1x1": {"conv_1x1_as_mm": True},
    "cdt": {"coordinate_descent_tuning": True},
    "freeze": {"freezing": True},
    "mag": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
}


def inductor_settings(features: set[str] | list[str]) -> dict[str, Any]:
    """The torch._inductor.config values of the named INDUCTOR_FEATURES (others are ignored)."""
    return {k: v for f in features for k, v in INDUCTOR_FEATURES.get(f, {}).items()}


def check_inductor(settings: dict[str, Any]) -> None:
    """One line naming any key that is not a `torch._inductor.config` setting."""
    from torch._inductor import config

    unknown = sorted(k for k in settings if not hasattr(config, k))
    if unknown:
        raise ValueError(f"callbacks.speed.inductor: {unknown} are not torch._inductor.config settings "
                         "(e.g. conv_1x1_as_mm, coordinate_descent_tuning)")


def set_inductor(settings: dict[str, Any]) -> None:
    """Set `torch._inductor.config` names for the compilations that follow (process-wide)."""
    from torch._inductor import config

    check_inductor(settings)
    for key, value in settings.items():
        setattr(config, key, value)


def repeated_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The block classes every submodule of `model` declares in `_repeated_blocks`."""
    found: list[type[nn.Module]] = []
    for module in model.modules():
        found += [t for t in getattr(module, "_repeated_blocks", ()) if t not in found]
    return tuple(found)


def compile_model(model: nn.Module, scope: CompileScope = "regional", mode: str | None = None,
                  fullgraph: bool = True) -> int:
    """Compile `model` in place; returns how many modules were compiled.

    regional: each repeated block (nested ones inside a compiled block are left to it); full: every top-level
    model that declares `_repeated_blocks` (the U-Net, the VAE), as one graph each, or as its `compile_whole`
    says (the VAE: encoder and decoder trunk).
    """
    if scope == "none":
        return 0
    if scope not in ("regional", "full"):
        raise ValueError(f"compile={scope!r}: valid are none, regional, full")
    if scope == "full":
        targets = [m for m in model.modules() if getattr(m, "_repeated_blocks", None)]
        fullgraph = False  # a whole U-Net graph breaks on its input checks; the blocks do not
    else:
        types = repeated_block_types(model)
        targets = [m for m in model.modules() if isinstance(m, types)]
    targets = _outermost(targets)
    # instances of one block class share Dynamo's cache entry, one graph per distinct shape (SD1.5's U-Net has
    # ~15 ResBlock shapes): past the default limit of 8 the rest would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for module in targets:
        if scope == "full" and hasattr(module, "compile_whole"):  # a model that says what "whole" means (the VAE)
            count += module.compile_whole(mode=mode, fullgraph=fullgraph, dynamic=False)
        else:
            module.compile(mode=mode, fullgraph=fullgraph, dynamic=False)
            count += 1
    return count


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """Drop modules contained in another listed module (compiling the outer one covers them)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


def to_channels_last(model: nn.Module) -> nn.Module:
    """4-D parameters and buffers (conv weights) in NHWC; convs then return NHWC activations, which the
    following layers keep, so the inputs need no conversion."""
    return model.to(memory_format=torch.channels_last)


def set_sdpa_order(order: list[str] | tuple[str, ...] | None) -> None:
    """Make `scaled_dot_product_attention` try the named backends first, in this order (None: torch's order).

    Backends left out stay enabled after the named ones, so a shape the first cannot run still runs.
    """
    if not order:
        return
    unknown = [name for name in order if name not in SDPA_BACKENDS]
    if unknown:
        raise ValueError(f"sdpa_backends={list(order)}: unknown {unknown}; valid are {sorted(SDPA_BACKENDS)}")
    first = [int(SDPA_BACKENDS[name]) for name in order]
    rest = [b for b in torch._C._get_sdp_priority_order() if b not in first]
    torch._C._set_sdp_priority_order(first + rest)  # what sdpa_kernel(..., set_priority=True) sets


# the layers whose weight and bias autocast hands to a low-precision kernel (its "lower_precision_fp" op list)
MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """For inference under autocast: store the weights and biases of the linear and conv layers in `dtype` once;
    returns how many layers were cast.

    Autocast casts them to `dtype` on every call anyway: for SD1.5's U-Net a 0.86 G-parameter fp32 read and bf16
    write per U-Net evaluation, 100 per 50-step CFG batch. Cast ahead, the kernels see bit-identical operands. Norm
    layers keep fp32 parameters: autocast computes them in fp32. Not for training: the optimizer updates fp32.
    """
    layers = [m for m in model.modules() if isinstance(m, MATMUL_LAYERS)]
    for layer in layers:
        layer.to(dtype)
    return len(layers)


def enable_tensor_cores() -> None:
    """TF32 for the fp32 matmuls and convs left outside autocast (optimizer-free parts, fp32 heads)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
