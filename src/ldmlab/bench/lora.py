"""LoRA training speed and memory on the SD1.5 U-Net at 512 px (issue 20, item 4): full fine-tuning, our adapters
(ldmlab.finetune.lora) and diffusers' UNet2DConditionModel + PEFT, same ranks, targets and batch, in one call.

    python -m ldmlab.bench.lora [--variants full,ours:16,peft:16+cl+compile,...] [--batch 16] [--pixels 512]
                                [--iters 20] [--budget-s 520] [--out docs/BENCHMARKS.md] [--tiny]

A variant is `<impl>[:<rank>][+feature...]` (built and checked in bench.lora_models). impl: `full` (every weight
of our U-Net trains), `ours:<r>` (`add_lora` on conf/finetune/lora.yaml's default targets, the attention
q/k/v/out projections) or `peft:<r>` (diffusers' U-Net of the same config; `unet.requires_grad_(False)`, then
`unet.add_adapter(peft.LoraConfig(r, lora_alpha=r, target_modules=PEFT_TARGETS, init_lora_weights="gaussian"))`
as diffusers' train_text_to_image_lora.py does; alpha = rank on both sides, that script's choice). Features:
`cl` channels_last, `compile` torch.compile of the whole U-Net, `ro` its reduce-overhead mode (CUDA graphs),
`cudnn_sdpa` cuDNN attention first (as bench.unet; `ours:16+cl+compile+ro+cudnn_sdpa` is what `train.py
finetune=lora trainer=gpu` applies on one GPU: conf/speed/gpu.yaml, callbacks.speed.AUTO), `bf16base` the frozen
weights stored in bf16 (what diffusers' script does under bf16 mixed precision; ldmlab keeps them fp32). A step:
forward + MSE + backward + fused AdamW over the trainable tensors, bf16 autocast, fixed random inputs.

Checked before any timing, so that a target mismatch cannot pass for a speed-up: at every rank ours and PEFT train
as many parameters in as many layers (counted on the meta device; a mismatch stops the run), and in each row an
eager backward gives a gradient to exactly the trainable tensors (the adapters; every tensor for `full`). Compiled
rows note graph breaks and, with `ro`, inductor's CUDA-graph skips and the first reason given.

Defaults, for one 10-minute H200 call (≈ 7-8 min):
- batch 16 (diffusers' LoRA script's default): full fine-tuning at 512 px needs ≈ 25 GiB (docs/BENCHMARKS.md,
  session 6: 35-36 GiB at batch 32, 14 GiB of it fp32 weights, gradients and Adam moments, the rest activations,
  which halve with the batch), far inside 139 GiB, and an eager step (≈ 0.1-0.2 s) stays GPU-bound.
- eager rows, ≈ 5-10 s each (build, checks, 25 steps): full, ours and PEFT at ranks 4, 16, 64, and both with
  `bf16base` at rank 16.
- compiled rows at rank 16 only: ours with trainer=gpu's settings and PEFT with channels_last + compile
  (diffusers' best in bench.unet). A whole SD1.5 compile took 111-172 s on the H200 (docs/BENCHMARKS.md, sessions
  4-6): two fit, a third would not. Other compiled rows (other ranks, `full+cl+compile+ro+cudnn_sdpa`,
  `ours:16+cl+compile` without CUDA graphs, ...) cost ≈ 3 min each through --variants; a compiled row that would
  end past --budget-s is left out with a printed line, so that the table is still written.
`--tiny`: a small U-Net at 64 px, batch 2, the eager rows: a CPU rehearsal of every path in under a minute.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmlab import accel
from ldmlab.bench import common, unet
from ldmlab.bench.lora_models import (
    CONTEXT_TOKENS,
    TINY,
    Forward,
    Variant,
    build,
    cast_frozen,
    check_gradients,
    check_parity,
    check_trainable,
    full_config,
    parse_variant,
    peft_available,
)

# eager first (a compile that overruns the budget then costs no eager row), then ours compiled: were only one
# compile to fit, ours against PEFT eager still says something, PEFT compiled alone nothing
DEFAULT_VARIANTS = ("full", "ours:4", "peft:4", "ours:16", "peft:16", "ours:64", "peft:64", "ours:16+bf16base",
                    "peft:16+bf16base", "ours:16+cl+compile+ro+cudnn_sdpa", "peft:16+cl+compile")
COMPILE_S = 220.0  # a compiled SD1.5 row's warm-up and timing on the H200, with margin (111-172 s measured)


def step_fn(model: nn.Module, fwd: Forward, params: list[nn.Parameter], x: Tensor, t: Tensor,
            c: Tensor) -> Callable[[], None]:
    """One training step on fixed inputs: bf16 autocast forward, MSE to fixed noise, backward, fused AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    noise = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(x.device.type, torch.bfloat16):
            out = fwd(model, x, t, c)
        F.mse_loss(out.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def cudagraph_skip_reasons() -> Iterator[list[str]]:
    """The `skipping cudagraphs due to <reason>` warnings inductor gives inside the block (its artifact logger
    stays silent unless TORCH_LOGS names it)."""
    handler, logger = _Collect(), logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def compiler_counts() -> tuple[int, int]:
    """(CUDA-graph skips, graph breaks) counted by dynamo/inductor so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"], sum(counters["graph_break"].values())


def time_row(variant: Variant, config: dict[str, Any], pixels: int, batch: int, iters: int,
             device: str) -> dict[str, Any]:
    """img/s, peak GiB, warm-up s, trainable parameters and a note of one variant's training step."""
    try:
        if "cudnn_sdpa" in variant.features:  # before any compile: inductor's cache does not key on the order
            accel.set_sdpa_order(["cudnn"])
        model, fwd, note = build(variant, config, device)
        check_trainable(variant, model)
        if "bf16base" in variant.features:
            cast_frozen(model)
        g, shape = torch.Generator(device).manual_seed(0), full_config(config)
        latent = pixels // 8
        x = torch.randn(batch, shape["in_channels"], latent, latent, device=device, generator=g)
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        c = torch.randn(batch, CONTEXT_TOKENS, shape["context_dim"], device=device, generator=g)
        check_gradients(variant, model, fwd, x, t, c)
        common.free_gpu()  # the check's gradients are gone; peak memory counts from here
        before = compiler_counts()
        params = [p for p in model.parameters() if p.requires_grad]
        step = step_fn(unet.prepare(model, set(variant.features)), fwd, params, x, t, c)
        with cudagraph_skip_reasons() as reasons:
            warmup = common.timed_warmup(step)  # compiles here
            seconds = common.cuda_seconds(step, iters, warmup=2)
        skips, breaks = (a - b for a, b in zip(compiler_counts(), before, strict=True))
    finally:
        unet.reset_sdpa()
        if "ro" in variant.features:  # free the CUDA graphs' memory pool, or the next row's peak would count it
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
    if variant.compiled:
        graphs = [f"CUDA-graph skips: {skips}", *reasons[:1]] if "ro" in variant.features else []
        note = "; ".join(filter(None, [note, f"{breaks} graph breaks", *graphs]))
    return {"img_s": batch / seconds, "peak_gib": common.peak_gib(), "warmup_s": warmup,
            "trainable": sum(p.numel() for p in params), "note": note}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b and not (math.isnan(a) or math.isnan(b)) else "–"  # NaN: no peak on the CPU


def _gib(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f}"  # NaN: no peak counter (CPU)


def table(results: dict[Variant, dict[str, Any]]) -> str:
    """Markdown rows: ours against PEFT's fastest row of the same rank, compiled or not and base dtype, and against
    full fine-tuning with the same features."""
    lines = ["| variant | rank | trainable M | img/s | × full | × PEFT | peak GiB | peak × PEFT | warm-up s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in results.items():
        full = next((q for w, q in results.items() if w.impl == "full" and w.features == v.features), None)
        peers = [q for w, q in results.items() if w.impl == "peft" and w.peer_key == v.peer_key]
        peer = max(peers, key=lambda q: q["img_s"]) if peers and v.impl == "ours" else None
        lines.append(f"| {v.name} | {v.rank or '–'} | {r['trainable'] / 1e6:.2f} | {r['img_s']:.1f} | "
                     f"{_ratio(r['img_s'], full['img_s']) if full and v.impl != 'full' else '–'} | "
                     f"{_ratio(r['img_s'], peer['img_s']) if peer else '–'} | {_gib(r['peak_gib'])} | "
                     f"{_ratio(r['peak_gib'], peer['peak_gib']) if peer else '–'} | {r['warmup_s']:.0f} | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


def _fastest(results: dict[Variant, dict[str, Any]], impl: str,
             rank: int) -> tuple[Variant, dict[str, Any]] | None:
    rows = [(v, r) for v, r in results.items() if (v.impl, v.rank) == (impl, rank)]
    return max(rows, key=lambda row: row[1]["img_s"]) if rows else None


def goal_lines(results: dict[Variant, dict[str, Any]]) -> list[str]:
    """Issue 20's goal per rank: our fastest row ≥ 1.3× PEFT's fastest at no more peak memory."""
    lines = []
    for rank in sorted({v.rank for v in results if v.rank}):
        ours, peft = (_fastest(results, impl, rank) for impl in ("ours", "peft"))
        if ours is None or peft is None:
            continue
        (ov, o), (pv, p) = ours, peft
        speed, memory = o["img_s"] / p["img_s"], _ratio(o["peak_gib"], p["peak_gib"])
        met = speed >= 1.3 and (memory == "–" or o["peak_gib"] <= p["peak_gib"])
        lines.append(f"- rank {rank}: ours `{ov.name}` {o['img_s']:.1f} img/s against PEFT `{pv.name}` "
                     f"{p['img_s']:.1f}: **{speed:.2f}×**, peak memory {memory}× — goal ≥ 1.3× at no more memory "
                     f"{'met' if met else 'not met'}")
    return lines


def run(variants: Sequence[str], config: dict[str, Any], pixels: int, batch: int, iters: int,
        budget_s: float = math.inf) -> str:
    """The checks, every row (a failing row is printed and skipped; a compiled one that would end past `budget_s`
    seconds from now is left out) and the Markdown table with the goal lines."""
    deadline = time.monotonic() + budget_s
    parsed = [parse_variant(v) for v in variants]  # every name checked before any work
    device = "cuda" if torch.cuda.is_available() else "cpu"
    have_peft = peft_available()
    if not have_peft and any(v.impl == "peft" for v in parsed):
        print("PEFT rows skipped: peft is not installed (pip install peft)", flush=True)
        parsed = [v for v in parsed if v.impl != "peft"]
    counts = check_parity(config, [v.rank for v in parsed if v.rank], have_peft)
    from ldmlab.bench.gpu import guarded

    results: dict[Variant, dict[str, Any]] = {}
    for v in parsed:
        if v.compiled and time.monotonic() + COMPILE_S > deadline:
            print(f"lora {v.name}: left out, a compile (≈ {COMPILE_S:.0f} s) would pass --budget-s", flush=True)
            continue
        if (r := guarded(f"lora {v.name}", partial(time_row, v, config, pixels, batch, iters, device))):
            results[v] = r
            print(f"  {v.name:36s} {r['img_s']:8.1f} img/s  peak {_gib(r['peak_gib'])} GiB  "
                  f"warm-up {r['warmup_s']:.0f} s  {r['note']}", flush=True)
    parity = ", ".join(f"rank {r}: {p / 1e6:.2f} M in {n} layers" for r, (p, n) in counts.items())
    same = "ours = PEFT, checked on the meta device" if have_peft else "ours only: peft is not installed"
    text = [f"Trainable parameters ({same}): {parity or 'no LoRA rows'}.", "", table(results), *goal_lines(results)]
    return "\n".join(text) + "\n"


def versions() -> str:
    """common.environment() and peft's version (diffusers' is already in it)."""
    try:
        return f"{common.environment()}, peft {md.version('peft')}"
    except md.PackageNotFoundError:
        return f"{common.environment()}, no peft"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)}; "
                        "--tiny: its eager ones)")
    parser.add_argument("--pixels", type=int, default=None, help="image side (latents pixels/8); 512, --tiny 64")
    parser.add_argument("--batch", type=int, default=None, help="16, --tiny 2")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per row: 20, --tiny 2")
    parser.add_argument("--tiny", action="store_true", help="a small U-Net, for a CPU rehearsal of every code path")
    parser.add_argument("--budget-s", type=float, default=520.0,
                        help="leave out compiled rows that would end later than this many seconds after the start "
                        "(520: the rows end within a 10-minute call, with pip and Python's start)")
    parser.add_argument("--out", type=Path, default=None, help="append the section to this Markdown file")
    args = parser.parse_args(argv)
    config = TINY if args.tiny else {}  # {}: UNetModel's defaults, SD1.5 (conf/model/unet_sd15.yaml)
    eager = [v for v in DEFAULT_VARIANTS if "compile" not in v]
    variants = args.variants.split(",") if args.variants else (eager if args.tiny else list(DEFAULT_VARIANTS))
    pixels, batch = args.pixels or (64 if args.tiny else 512), args.batch or (2 if args.tiny else 16)
    iters = args.iters or (2 if args.tiny else 20)
    accel.enable_tensor_cores()
    body = run(variants, config, pixels, batch, iters, args.budget_s)
    command = " ".join(["python -m ldmlab.bench.lora", *(sys.argv[1:] if argv is None else argv)])
    size = "tiny U-Net (CPU rehearsal)" if args.tiny else "SD1.5 U-Net"
    text = "\n".join([f"### LoRA training step, {size}, {pixels} px, batch {batch} ({versions()})", "",
                      f"    {command}", "",
                      ("bf16 autocast, fused AdamW on the trainable tensors, alpha = rank, targets: the attention "
                       "q/k/v/out projections."), "", body])
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
