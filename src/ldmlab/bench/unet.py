"""SD1.5 U-Net training step, ours against diffusers' UNet2DConditionModel built from the same config.

A variant is `<impl>[+feature...]`: impl `ours` or `diffusers`; features `cl` (channels_last), `compile`
(whole model), `regional` (each repeated block, ldmlab.accel), `cudnn_sdpa` (cuDNN attention first),
`ro` (compile mode reduce-overhead: CUDA graphs of the compiled forward and backward), `graph` (the whole
step — forward, backward, fused AdamW — captured in one CUDA graph by hand), `c1x1` / `cdt` / `freeze` /
`mag` (inductor settings, accel.INDUCTOR_FEATURES; `mag` is `ma`'s template autotuning in the variant's own
compile mode), `ma` (compile mode max-autotune: Triton GEMM/conv templates
autotuned against cuBLAS/cuDNN, CUDA graphs only with `ro`), `bench` (cudnn.benchmark: cuDNN times its
convolution algorithms instead of taking its heuristic's first). A step is forward + MSE + backward + fused
AdamW under bf16 autocast with fp32 master weights. (`qkv`, self-attention's q, k, v from one GEMM, was measured
without effect in sessions 5-6 of docs/BENCHMARKS.md and removed with its option.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldmlab import accel
from ldmlab.bench.common import cuda_seconds, peak_gib, timed_warmup
from ldmlab.nn.unet import UNetModel

FEATURES = {"cl", "compile", "regional", "cudnn_sdpa", "ro", "graph", "c1x1", "cdt", "freeze", "ma", "mag", "bench"}
Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def parse_variant(variant: str) -> tuple[str, set[str]]:
    impl, *features = variant.split("+")
    unknown = set(features) - FEATURES
    if impl not in ("ours", "diffusers") or unknown:
        raise ValueError(f"variant {variant!r}: impl ours|diffusers, features from {sorted(FEATURES)}")
    return impl, set(features)


def build_unet(impl: str) -> tuple[torch.nn.Module, Forward]:
    """The SD1.5 U-Net of `impl` and its forward(model, x, t, context) → prediction."""
    torch.manual_seed(0)
    ours = UNetModel()
    if impl == "ours":
        return ours, lambda m, x, t, c: m(x, t, context=c)
    from diffusers import UNet2DConditionModel

    from ldmlab.convert.unet import diffusers_unet_config

    model = UNet2DConditionModel(**diffusers_unet_config(ours.config))
    return model, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample


def unet_inputs(batch: int, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 4, latent, latent, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    return x, t, torch.randn(batch, 77, 768, device="cuda")


def forward_flops(model: torch.nn.Module, fwd: Forward, latent: int) -> float:
    """Forward FLOPs of one sample (FlopCounterMode counts matmuls, convs and SDPA)."""
    x, t, c = unet_inputs(1, latent)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), FlopCounterMode(display=False) as counter:
        fwd(model, x, t, c)
    return float(counter.get_total_flops())


def prepare(model: torch.nn.Module, features: set[str]) -> torch.nn.Module:
    """Apply the variant's layout and compilation; returns the module to call."""
    if "cl" in features:
        accel.to_channels_last(model)
    if "regional" in features:
        if isinstance(model, UNetModel):
            accel.compile_model(model, "regional")
        else:  # diffusers' own regional compilation (ModelMixin.compile_repeated_blocks)
            model.compile_repeated_blocks(fullgraph=True)
    if "compile" in features:
        model = torch.compile(model, mode=compile_mode(features))
    return model


def compile_mode(features: set[str]) -> str | None:
    """torch.compile's mode for the variant's features `ro` (CUDA graphs) and `ma` (max-autotune)."""
    if "ma" in features:
        return "max-autotune" if "ro" in features else "max-autotune-no-cudagraphs"
    return "reduce-overhead" if "ro" in features else None


def train_step_fn(model: torch.nn.Module, fwd: Forward, batch: int, latent: int, graph: bool) -> Callable[[], None]:
    """One training step on fixed inputs; `graph=True` replays the step captured in a CUDA graph."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graph)
    x, t, c = unet_inputs(batch, latent)
    noise = torch.randn_like(x)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            out = fwd(model, x, t, c)
        F.mse_loss(out.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=not graph)

    if not graph:
        return step
    side = torch.cuda.Stream()  # warm-up (and compilation) off the capture stream, as CUDA graphs require
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        step()
    return cuda_graph.replay


def make_step(variant: str, pixels: int, batch: int) -> tuple[Callable[[], None], float]:
    """The variant's training step (SDPA order set as asked: restore with `reset_sdpa()`) and its forward
    FLOPs per image."""
    impl, features = parse_variant(variant)
    model, fwd = build_unet(impl)
    model = model.cuda().train()
    flops = forward_flops(model, fwd, pixels // 8)
    if "cudnn_sdpa" in features:
        accel.set_sdpa_order(["cudnn"])
    torch.backends.cudnn.benchmark = "bench" in features
    model = prepare(model, features)
    return train_step_fn(model, fwd, batch, pixels // 8, graph="graph" in features), flops


def reset_sdpa() -> None:
    """torch's defaults for what variants change process-wide: the SDPA order and cudnn.benchmark."""
    accel.set_sdpa_order(["flash", "efficient", "math", "cudnn"])
    torch.backends.cudnn.benchmark = False


def time_unet_step(variant: str, pixels: int, batch: int, iters: int) -> dict[str, float]:
    """img/s, forward GFLOP/img, peak GiB and warm-up seconds of one variant's training step."""
    try:
        with torch._inductor.config.patch(accel.inductor_settings(parse_variant(variant)[1])):
            step, flops = make_step(variant, pixels, batch)
            warmup = timed_warmup(step)  # compiles here, with the variant's inductor settings
        seconds = cuda_seconds(step, iters, warmup=2)
    finally:
        reset_sdpa()
    return {"img_s": batch / seconds, "gflop": flops / 1e9, "peak_gib": peak_gib(), "warmup_s": warmup}
