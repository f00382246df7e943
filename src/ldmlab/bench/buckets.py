"""Aspect-ratio buckets under `speed=gpu` (issue 21): compiles, warm-up and throughput of the SD1.5 U-Net training
step over five buckets of about 512² pixels against the square 512 px step, in one process.

    python -m ldmlab.bench.buckets [--policies static,dynamic] [--batch 16] [--steps 40] [--out docs/BENCHMARKS.md]

Each policy compiles the U-Net as `train.py trainer=gpu` does for the LDM on one GPU (accel.compile_model: the
whole network, mode reduce-overhead, channels_last, cuDNN attention first), with `callbacks.speed.dynamic`:
`static` (False: one graph per bucket, the default), `dynamic` (True: one graph with symbolic sizes), `auto`
(None: torch's automatic choice). The step is forward + MSE + backward + fused AdamW under bf16 autocast, as in
bench.unet. Throughput is in megapixels/s, since the buckets' areas differ by up to 6 %; the buckets are visited
in a seeded shuffled order, as the data's shared bucket schedule does. `static_square` compiles the first bucket
alone: the square baseline without the other buckets' compiles (its warm-up is one static compile).
A policy the compiler refuses is reported as a failed row (on this repository's CPU rehearsal, 2026-12-03, torch
2.13's inductor CPU backend refused `dynamic` with "cannot determine truth value of Relational" while lowering a
stride-2 convolution's size; not yet tried on CUDA). `--tiny` runs a small U-Net at a quarter of the sizes on the CPU, eager, to check the harness.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ldmlab import accel
from ldmlab.bench.common import environment, free_gpu
from ldmlab.nn.unet import UNetModel

BUCKETS = "512x512,448x576,576x448,384x640,640x384"  # (H×W) pixels, multiples of 64, areas 0.94-1.0 × 512²
POLICIES = {"static": False, "dynamic": True, "auto": None, "static_square": False}
TINY = {"model_channels": 32, "channel_mult": [1, 2], "attention_levels": [1], "num_heads": 2, "context_dim": 32}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"512x512,448x576" → [(512, 512), (448, 576)] (H, W)."""
    return [(int(h), int(w)) for h, w in (item.split("x") for item in text.split(","))]


def graphs_compiled() -> int:
    """Dynamo's count of distinct compiled graphs in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def make_step(model: torch.nn.Module, batch: int, context: tuple[int, int], device: str
              ) -> Callable[[tuple[int, int]], None]:
    """step((H, W)): one training step at that image size on fixed random inputs (latents H/8 × W/8)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def step(size: tuple[int, int]) -> None:
        if size not in inputs:
            x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, device=device)
            t = torch.randint(0, 1000, (batch,), device=device)
            inputs[size] = (x, t, torch.randn(batch, *context, device=device), torch.randn_like(x))
        x, t, c, noise = inputs[size]
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            out = model(x, t, context=c)
        F.mse_loss(out.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_policy(policy: str, sizes: list[tuple[int, int]], batch: int, steps: int, tiny: bool,
               compile_on_cpu: bool = False) -> dict:
    """Warm-up per bucket (compile + CUDA graph recording), graphs compiled, Mpx/s over the shuffled buckets and
    at the first (square) bucket alone."""
    device = "cpu" if tiny else "cuda"
    torch.manual_seed(0)
    model = UNetModel(**TINY) if tiny else UNetModel()
    model = model.to(device).train()
    if not tiny:
        accel.to_channels_last(model)
        accel.set_sdpa_order(["cudnn", "flash"])
        accel.compile_model(model, "full", mode="reduce-overhead", dynamic=POLICIES[policy])
    elif compile_on_cpu:  # the rehearsal of the compile path: inductor's CPU backend, no CUDA graphs
        accel.compile_model(model, "full", dynamic=POLICIES[policy])
    sizes = sizes[:1] if policy == "static_square" else sizes
    step = make_step(model, batch, (77, model.config["context_dim"]), device)
    before, warmup = graphs_compiled(), {}
    for size in sizes:  # three calls each: compile, CUDA graph warm-up, recording
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            step(size)
        synchronize(device)
        warmup[size] = time.perf_counter() - t0
        print(f"{policy}: bucket {size[0]}x{size[1]} warm-up {warmup[size]:.1f} s", flush=True)  # a cut call keeps it
    order = [sizes[i % len(sizes)] for i in range(steps)]
    random.Random(0).shuffle(order)
    mixed = timed_mpx(step, order, batch, device)
    square = timed_mpx(step, [sizes[0]] * steps, batch, device)
    return {"policy": policy, "warmup": warmup, "graphs": graphs_compiled() - before, "mixed_mpx_s": mixed,
            "square_mpx_s": square, "buckets": sizes}


def timed_mpx(step: Callable[[tuple[int, int]], None], order: list[tuple[int, int]], batch: int,
              device: str) -> float:
    """Megapixels per second over the steps in `order` (wall time, synchronised at both ends)."""
    synchronize(device)
    t0 = time.perf_counter()
    for size in order:
        step(size)
    synchronize(device)
    return batch * sum(h * w for h, w in order) / 1e6 / (time.perf_counter() - t0)


def report(results: list[dict], args: argparse.Namespace) -> str:
    """Markdown: one row per policy; the ratio is against the static square step measured in the same call."""
    base = next((r["square_mpx_s"] for r in results if r["policy"] in ("static_square", "static") and
                 "error" not in r), None)
    rows = [("| policy (`callbacks.speed.dynamic`) | graphs compiled | warm-up s (per bucket) | square 512² Mpx/s | "
            "5 buckets shuffled Mpx/s | × static square |"), "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['policy']} | failed: {r['error']} | – | – | – | – |")
            continue
        per_bucket = ", ".join(f"{h}×{w}: {s:.0f}" for (h, w), s in r["warmup"].items())
        ratio = f"{r['mixed_mpx_s'] / base:.3f}" if base and r["policy"] != "static_square" else "–"
        rows.append(f"| {r['policy']} | {r['graphs']} | {sum(r['warmup'].values()):.0f} ({per_bucket}) | "
                    f"{r['square_mpx_s']:.1f} | {r['mixed_mpx_s']:.1f} | {ratio} |")
    head = (f"### Aspect-ratio buckets under speed=gpu ({environment()})\n\n    python -m ldmlab.bench.buckets "
            f"--policies {args.policies} --batch {args.batch} --steps {args.steps}\n\n")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", default=BUCKETS)
    parser.add_argument("--policies", default="static_square,dynamic", help=f"from {sorted(POLICIES)}")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="a small U-Net on the CPU at 1/4 the sizes, eager")
    parser.add_argument("--compile-on-cpu", action="store_true", help="with --tiny: compile as the policy says")
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    sizes = parse_sizes(args.buckets)
    if args.tiny:
        sizes = [(h // 4, w // 4) for h, w in sizes]
    results = []
    for policy in args.policies.split(","):
        if policy not in POLICIES:
            raise SystemExit(f"--policies: {policy!r} is not one of {sorted(POLICIES)}")
        try:
            results.append(run_policy(policy, sizes, args.batch, args.steps, args.tiny, args.compile_on_cpu))
        except Exception as error:  # noqa: BLE001 — a policy the compiler refuses is a result: keep the others
            results.append({"policy": policy, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
        print(results[-1], flush=True)
        if not args.tiny:
            free_gpu()
    text = report(results, args)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
