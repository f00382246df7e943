"""GPU speed switches applied to the networks from outside (torchtitan's `parallelize`/`apply_compile` idea): the
training path (callbacks.speed.GPUSpeed), sample.py and the benchmarks (bench.gpu) call these; no network class
carries a speed flag.

- channels_last: cuDNN's convolutions and the compiler's GroupNorm+SiLU kernels run on NHWC without the
  NCHW↔NHWC transposes an NCHW model pays around every conv on tensor cores.
- compilation, by network type (REPEATED_BLOCKS, WHOLE): regional = `torch.compile` of every repeated block in
  place, so state-dict names do not change; blocks of one shape share a compiled graph and each graph is small,
  so warm-up is a fraction of a whole-model compile (diffusers' `compile_repeated_blocks` follows the same
  idea). full = each network as one graph, or the parts WHOLE names for it.
- SDPA backend order: which fused attention kernel `scaled_dot_product_attention` tries first.
- inductor settings: `torch._inductor.config` names (1x1 convs as matmuls, coordinate-descent tuning, ...).
- matmul weights in bf16 for inference under autocast: the casts autocast would repeat on every call, done once.

What each choice bought is measured in docs/BENCHMARKS.md, not restated here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend

from ldmlab.nn.attention import SpatialTransformer
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.autoencoder_blocks import AttnBlock, ResnetBlock
from ldmlab.nn.unet import UNetModel
from ldmlab.nn.unet_blocks import ResBlock

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


def _compile_vae_whole(vae: AutoencoderKL, **compile_kwargs: Any) -> int:
    """The encoder and the decoder's trunk as one graph each, the decoder's output conv left eager; returns 2.

    The GAN's adaptive weight (VQGAN eq. 7) takes the gradients of two losses w.r.t. that conv's weight every
    step; a compiled graph is one autograd node, so with the conv inside it each of those gradients would run the
    whole decoder's backward. The compiled trunk is an instance attribute that `Decoder.forward` calls in place
    of the method; parameters and state-dict names are untouched.
    """
    vae.encoder.compile(**compile_kwargs)
    vae.decoder.trunk = torch.compile(vae.decoder.trunk, **compile_kwargs)  # type: ignore[method-assign]
    return 2


def _compile_as_one_graph(network: nn.Module, **compile_kwargs: Any) -> int:
    network.compile(**compile_kwargs)
    return 1


# The policy's tables, by network type (the networks carry no speed flags).
# regional: the blocks that repeat through each network; instances of one class share Dynamo's cache entry,
# one compiled graph per distinct shape
REPEATED_BLOCKS: dict[type[nn.Module], tuple[type[nn.Module], ...]] = {
    UNetModel: (ResBlock, SpatialTransformer),
    AutoencoderKL: (ResnetBlock, AttnBlock),
}
# full: what "whole" means for a network; one not listed is compiled as one graph
WHOLE: dict[type[nn.Module], Callable[..., int]] = {AutoencoderKL: _compile_vae_whole}


def _lookup(table: dict[type[nn.Module], Any], module: nn.Module, default: Any = None) -> Any:
    """The entry of the first table type `module` is an instance of."""
    return next((value for kind, value in table.items() if isinstance(module, kind)), default)


def networks(model: nn.Module) -> list[nn.Module]:
    """The networks in `model` that REPEATED_BLOCKS knows (the U-Net, the VAE), not those nested in another."""
    return _outermost([m for m in model.modules() if isinstance(m, tuple(REPEATED_BLOCKS))])


def repeated_block_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The block classes regional compilation compiles in `model` (REPEATED_BLOCKS of its networks)."""
    found: list[type[nn.Module]] = []
    for network in networks(model):
        found += [t for t in _lookup(REPEATED_BLOCKS, network) if t not in found]
    return tuple(found)


def compile_model(model: nn.Module, scope: CompileScope = "regional", mode: str | None = None,
                  fullgraph: bool = True, backend: str = "inductor", dynamic: bool | None = False) -> int:
    """Compile the networks in `model` in place; returns how many modules (or trunks) were compiled.

    regional: each REPEATED_BLOCKS block of each network (nested ones inside a compiled block are left to it);
    full: each network as one graph, or the parts its WHOLE entry names (the VAE: encoder and decoder trunk).
    dynamic: False, one graph per input shape (each aspect-ratio bucket compiles once, up to the recompile limit);
    True, one graph with symbolic sizes for all shapes (CUDA graphs are still recorded per shape); None, torch's
    automatic choice (static first, symbolic from the first shape change).
    """
    if scope == "none":
        return 0
    if scope not in ("regional", "full"):
        raise ValueError(f"compile={scope!r}: valid are none, regional, full")
    # SD1.5's U-Net has ~15 ResBlock shapes: past Dynamo's default limit of 8 graphs per cache entry the rest
    # would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    kwargs: dict[str, Any] = {"mode": mode, "dynamic": dynamic, "backend": backend}
    count = 0
    for network in networks(model):
        if scope == "full":  # a whole U-Net graph breaks on its input checks; the blocks do not
            count += _lookup(WHOLE, network, _compile_as_one_graph)(network, fullgraph=False, **kwargs)
            continue
        blocks = _outermost([m for m in network.modules() if isinstance(m, _lookup(REPEATED_BLOCKS, network))])
        for block in blocks:
            block.compile(fullgraph=fullgraph, **kwargs)
        count += len(blocks)
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
