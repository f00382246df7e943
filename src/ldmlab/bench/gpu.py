"""GPU benchmark: SD1.5 U-Net training step, ours against diffusers' UNet2DConditionModel, in one process.

    python -m ldmlab.bench.gpu [--cases 256x64,256x128,512x32] [--variants ...] [--iters 20] [--out docs/BENCHMARKS.md]

Each case is `<pixels>x<batch>` (latents are pixels/8). A training step is forward + MSE + backward + fused AdamW
under bf16 autocast with fp32 master weights, SDPA attention, timed with CUDA events after warm-up. MFU uses the
forward FLOPs counted by torch's FlopCounterMode (×3 for a training step) against the 989 TF/s datasheet and
against a bf16 matmul ceiling measured in the same run. diffusers is optional (its rows are skipped without it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldmlab.nn.unet import UNetModel

DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16
VARIANTS = ("ours_eager", "diffusers_eager", "diffusers_compile_cl", "ours_compile_cl")


def matmul_ceiling(n: int = 8192, iters: int = 50) -> float:
    """Measured dense bf16 matmul throughput (TFLOP/s): the practical ceiling for MFU."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def build(variant: str) -> tuple[torch.nn.Module, Callable]:
    """The model for a variant and its forward(x, t, ctx) → prediction."""
    torch.manual_seed(0)
    ours = UNetModel()
    if variant.startswith("ours"):
        return ours, lambda m, x, t, c: m(x, t, context=c)
    from diffusers import UNet2DConditionModel

    from ldmlab.convert.unet import diffusers_unet_config

    model = UNet2DConditionModel(**diffusers_unet_config(ours.config))
    del ours
    return model, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample


def forward_flops(model: torch.nn.Module, fwd: Callable, latent: int) -> float:
    """Forward FLOPs of one sample (FlopCounterMode counts matmuls, convs and SDPA)."""
    x, t, c = inputs(1, latent)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), FlopCounterMode(display=False) as counter:
        fwd(model, x, t, c)
    return float(counter.get_total_flops())


def inputs(batch: int, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 4, latent, latent, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    return x, t, torch.randn(batch, 77, 768, device="cuda")


def time_train_step(variant: str, pixels: int, batch: int, iters: int) -> dict[str, float]:
    """img/s and forward GFLOP/sample of one variant's training step."""
    model, fwd = build(variant)
    model = model.cuda().train()
    latent = pixels // 8
    flops = forward_flops(model, fwd, latent)
    if variant.endswith("compile_cl"):
        model = model.to(memory_format=torch.channels_last)
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, t, c = inputs(batch, latent)
    if variant.endswith("compile_cl"):
        x = x.contiguous(memory_format=torch.channels_last)
    noise = torch.randn_like(x)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            out = fwd(model, x, t, c)
        F.mse_loss(out.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"img_s": batch / seconds, "gflop": flops / 1e9, "peak_gib": peak}


def free_gpu() -> None:
    """Release the last variant's model and optimizer state before the next one is built."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def markdown(rows: list[tuple[str, int, int, dict[str, float]]], ceiling: float) -> str:
    import importlib.metadata as md

    versions = f"torch {torch.__version__}"
    for pkg in ("diffusers",):
        try:
            versions += f", {pkg} {md.version(pkg)}"
        except md.PackageNotFoundError:
            pass
    lines = [(f"### SD1.5 U-Net training step ({dt.date.today()}, {torch.cuda.get_device_name()}, {versions}, "
              f"Python {platform.python_version()})"), "",
             f"bf16 autocast, SDPA, fused AdamW. Measured bf16 matmul ceiling: {ceiling:.0f} TF/s.", "",
             "| pixels | batch | variant | img/s | fwd GFLOP/img | MFU vs 989 | MFU vs ceiling | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, pixels, batch, r in rows:
        achieved = 3 * r["gflop"] * r["img_s"] / 1e3  # TF/s: training ≈ 3 × forward
        lines.append(f"| {pixels} | {batch} | {variant} | {r['img_s']:.1f} | {r['gflop']:.0f} | "
                     f"{achieved / DATASHEET_TFLOPS:.1%} | {achieved / ceiling:.1%} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="256x64,256x128,512x32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="append the table to this Markdown file")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling: {ceiling:.0f} TF/s", flush=True)
    rows = []
    for case in args.cases.split(","):
        pixels, batch = map(int, case.split("x"))
        for variant in args.variants.split(","):
            try:
                result = time_train_step(variant, pixels, batch, args.iters)
            except (ImportError, torch.OutOfMemoryError) as err:  # report and go on with the next row
                print(f"{variant} {case}: skipped ({type(err).__name__}: {err})", flush=True)
                continue
            finally:
                free_gpu()
            rows.append((variant, pixels, batch, result))
            print(f"{variant:22s} {case:8s} {result['img_s']:8.1f} img/s  {result['gflop']:.0f} GFLOP/img  "
                  f"{result['peak_gib']:.1f} GiB", flush=True)
    table = markdown(rows, ceiling)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + table)
    return table


if __name__ == "__main__":
    main()
