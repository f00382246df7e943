"""GPU benchmark, ours against diffusers in one process: SD1.5 U-Net training step, VAE encode/decode and
training step, 50-step DDIM with CFG, and the `train.py` path on synthetic latents; writes Markdown.

    python -m ldmlab.bench.gpu [--parts ceiling,sdpa,unet,profile,vae,vae_train,sampling,sampling_profile,train,train_profile,lora]
                               [--cases 256x64,256x128,512x32] [--variants ours+cl+regional,...]
                               [--iters 20] [--out docs/BENCHMARKS.md]

The training path against the bare step in one call (train.py model=unet_sd15 trainer=gpu
data=synthetic_latents: 256 px, batch 64, on synthetic latents, with trainer=gpu's speed settings; the bare step:
forward + backward + fused AdamW of the same U-Net at 256 px, batch 64, with the same settings). The train table's
"× bare" column is the ratio (issue 18's goal: within 3 %):

    python -m ldmlab.bench.gpu --parts unet,train --cases 256x64 --variants ours+cl+compile+ro+cudnn_sdpa \\
        --train-extras "" --out docs/BENCHMARKS.md

U-Net cases are `<pixels>x<batch>` (latents pixels/8); variants are `<ours|diffusers>[+cl][+compile|+regional]
[+cudnn_sdpa][+ro][+graph]` (bench.unet). MFU uses the forward FLOPs counted by torch's FlopCounterMode (×3 for a
training step) against the 989 TF/s datasheet and against a bf16 matmul ceiling measured in the same run.
diffusers is optional: its rows are skipped without it. Every part prints its table as soon as it is done.
`--parts lora` is bench.lora's table (full fine-tuning, our LoRA and diffusers + PEFT at `--lora-case`); alone,
`python -m ldmlab.bench.lora` does the same with its own heading.
"""

from __future__ import annotations

import argparse
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ldmlab import accel
from ldmlab.bench import common, lora, unet

DEFAULT_VARIANTS = ("diffusers", "diffusers+cl+compile", "ours", "ours+cl+compile+cudnn_sdpa",
                    "ours+cl+compile+ro+cudnn_sdpa", "ours+cl+compile+graph+cudnn_sdpa")
DEFAULT_PARTS = "ceiling,sdpa,unet,profile,vae,vae_train,sampling,train"
# what `train.py ... trainer=gpu` runs on one GPU, as a bare step: whole-model compile with CUDA graphs
# (callbacks.speed.AUTO), channels_last, cuDNN attention first (conf/speed/gpu.yaml)
BARE = "ours+cl+compile+ro+cudnn_sdpa@256x64"


def unet_part(cases: list[str], variants: list[str], iters: int, ceiling: float,
              measured: dict[str, float] | None = None) -> str:
    """The U-Net step table; each variant's img/s also goes to `measured` as `variant@case`."""
    lines = [("| pixels | batch | variant | img/s | × diffusers best | × diffusers eager | MFU vs 989 | "
              "MFU vs ceiling | peak GiB | warm-up s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        pixels, batch = map(int, case.split("x"))
        results: dict[str, dict[str, float]] = {}
        for variant in variants:
            result = guarded(f"unet {variant} {case}", partial(unet.time_unet_step, variant, pixels, batch, iters))
            if result:
                results[variant] = result
                if measured is not None:
                    measured[f"{variant}@{case}"] = result["img_s"]
                print(f"  {variant:28s} {case:8s} {result['img_s']:8.1f} img/s  warm-up {result['warmup_s']:.0f} s",
                      flush=True)
        peer = [r["img_s"] for v, r in results.items() if v.startswith("diffusers")]
        eager = results.get("diffusers", {}).get("img_s")
        for variant, r in results.items():
            achieved = 3 * r["gflop"] * r["img_s"] / 1e3  # TF/s: a training step ≈ 3 × forward
            best = f"{r['img_s'] / max(peer):.2f}" if peer else "–"
            vs_eager = f"{r['img_s'] / eager:.2f}" if eager else "–"
            lines.append(f"| {pixels} | {batch} | {variant} | {r['img_s']:.1f} | {best} | {vs_eager} | "
                         f"{achieved / common.DATASHEET_TFLOPS:.1%} | {achieved / ceiling:.1%} | "
                         f"{r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def profile_part(variant: str, case: str) -> str:
    from ldmlab.bench import profile

    pixels, batch = map(int, case.split("x"))
    try:
        step, _ = unet.make_step(variant, pixels, batch)
        for _ in range(3):
            step()
        measured = profile.profile_step(step)
    finally:
        unet.reset_sdpa()
    return profile.report(f"{variant}, {pixels} px, batch {batch}", *measured)


def sdpa_part() -> str:
    from ldmlab.bench.profile import sdpa_backends

    # SD1.5 at 256 px, batch 64: self-attention per level (heads 8, d = 40, 80, 160) and cross-attention (S=77)
    shapes = [(64, 8, 1024, 1024, 40), (64, 8, 1024, 77, 40), (64, 8, 256, 256, 80), (64, 8, 64, 64, 160),
              (32, 8, 4096, 4096, 40)]
    return sdpa_backends(shapes)


def vae_part(iters: int, cases: list[str], variants: list[str]) -> str:
    from ldmlab.bench.vae import time_vae

    lines = [("| pixels | batch | variant | encode img/s | decode img/s | encode × diffusers eager | "
              "decode × diffusers eager | peak GiB | warm-up s |"), "|---|---|---|---|---|---|---|---|---|"]
    for pixels, batch in (map(int, case.split("x")) for case in cases):
        results = {}
        for variant in variants:
            if (r := guarded(f"vae {variant}", partial(time_vae, variant, pixels, batch, iters))):
                results[variant] = r
                print(f"  vae {variant:24s} {pixels}x{batch} enc {r['encode_img_s']:.1f} dec {r['decode_img_s']:.1f}",
                      flush=True)
        base = results.get("diffusers")
        for variant, r in results.items():
            enc = f"{r['encode_img_s'] / base['encode_img_s']:.2f}" if base else "–"
            dec = f"{r['decode_img_s'] / base['decode_img_s']:.2f}" if base else "–"
            lines.append(f"| {pixels} | {batch} | {variant} | {r['encode_img_s']:.1f} | {r['decode_img_s']:.1f} | "
                         f"{enc} | {dec} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def vae_train_part(rows: list[str]) -> str:
    """rows: `<compile scope>:<fused|foreach>`."""
    from ldmlab.bench.vae import time_vae_training

    lines = ["| pixels | batch | compile | Adam | img/s | peak GiB | warm-up s |", "|---|---|---|---|---|---|---|"]
    for scope, fused in ((row.split(":")[0], row.split(":")[1] == "fused") for row in rows):
        name = "fused (skips on the device)" if fused else "foreach (skips checked on the host)"
        if (r := guarded(f"vae train {scope} {name}",
                         lambda s=scope, f=fused: time_vae_training(256, 16, steps=40, scope=s, fused=f))):
            lines.append(f"| 256 | 16 | {scope} | {name} | {r['img_s']:.1f} | {r['peak_gib']:.1f} | "
                         f"{r['warmup_s']:.0f} |")
            print("  " + lines[-1], "\n" + r["syncs"], flush=True)
    return "\n".join(lines) + "\n"


def sampling_part(variants: list[str]) -> str:
    from ldmlab.bench.sampling import time_sampling

    lines = ["| variant | s / image | peak GiB | warm-up s |", "|---|---|---|---|"]
    for variant in variants:
        if (r := guarded(f"sampling {variant}", lambda v=variant: time_sampling(v))):
            lines.append(f"| {variant} | {r['s_per_img']:.3f} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")
            print("  " + lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def sampling_profile_part(variant: str) -> str:
    from ldmlab.bench.sampling import profile_sampling

    r = guarded(f"sampling profile {variant}", lambda: {"text": profile_sampling(variant)})
    return (r or {}).get("text") or "no profile (see the log)\n"


def train_part(steps: int, extras: list[list[str]], bare: float | None = None) -> str:
    """The train.py rows; `bare`: the bare step's img/s measured in this call, for the × bare column."""
    from ldmlab.bench.train_path import time_train_py

    lines = ["| command | img/s | × bare | s/step | warm-up s |", "|---|---|---|---|---|"]
    for extra in extras:
        if (r := guarded(f"train.py {extra}", lambda e=extra: time_train_py(e, steps))):
            lines.append(train_row(r, bare))
            print("  " + lines[-1], "\n" + r["syncs"], flush=True)
    return "\n".join(lines) + "\n"


def train_row(r: dict, bare: float | None) -> str:
    """One Markdown row of the train table (`–` in × bare when the bare step did not run in this call)."""
    ratio = f"{r['img_s'] / bare:.3f}" if bare else "–"
    return f"| `{r['command']}` | {r['img_s']:.1f} | {ratio} | {r['s_per_step']:.4f} | {r['warmup_s']:.0f} |"


def train_profile_part(steps: int, extra: list[str]) -> str:
    from ldmlab.bench.train_path import time_train_py

    r = guarded(f"train.py profile {extra}", lambda: time_train_py(extra, steps, profile_steps=5))
    return (r or {}).get("profile") or "no profile written (see the log)\n"


def lora_part(case: str, variants: list[str], iters: int) -> str:
    """bench.lora's rows at `case` (`<pixels>x<batch>`) on the SD1.5 U-Net."""
    pixels, batch = map(int, case.split("x"))
    return lora.run(variants, {}, pixels, batch, iters)


def guarded(name: str, fn: Callable[[], dict]) -> dict | None:
    """Run one measurement; a failure (no diffusers, OOM, a compiler error) is printed and skipped."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 — one failed row must not lose the rest of the GPU session
        print(f"{name}: skipped ({type(err).__name__}: {str(err)[:300]})", flush=True)
        traceback.print_exc(limit=3)
        return None
    finally:
        common.free_gpu()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=DEFAULT_PARTS)
    parser.add_argument("--cases", default="256x64,256x128,512x32")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--profile", default="ours+cl+compile+graph+cudnn_sdpa@256x64", help="variant@case to profile")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-extras", default=";speed=none",
                        help="';'-separated override sets for train.py, one row each (\"\": the defaults only)")
    parser.add_argument("--bare", default=BARE, help="variant@case of the unet part the train rows are compared with")
    parser.add_argument("--vae-cases", default="256x32,512x8")
    parser.add_argument("--vae-variants", default="diffusers,diffusers+cl+compile,ours,ours+cl+regional,ours+cl+compile")
    parser.add_argument("--vae-train-rows", default="none:foreach,none:fused,regional:fused,full:fused",
                        help="compile scope:Adam kind of each VAE training row")
    parser.add_argument("--sampling-variants", default="diffusers,ours,ours+cl+compile")
    parser.add_argument("--sampling-profile", default="ours+cl+compile+cudnn_sdpa", help="sampling variant to profile")
    parser.add_argument("--lora-case", default="512x16", help="<pixels>x<batch> of the lora part")
    parser.add_argument("--lora-variants", default=",".join(lora.DEFAULT_VARIANTS), help="bench.lora variants")
    parser.add_argument("--out", type=Path, default=None, help="append the tables to this Markdown file")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    accel.enable_tensor_cores()
    ceiling = common.matmul_ceiling()
    sections = [f"### GPU benchmark ({common.environment()})", "",
                f"Measured bf16 matmul ceiling: {ceiling:.0f} TF/s.", ""]
    extras = [e.split() for e in args.train_extras.split(";")]
    measured: dict[str, float] = {}
    train_cmd = "`train.py model=unet_sd15 trainer=gpu data=synthetic_latents`"
    runners = {
        "sdpa": ("SDPA backends, forward + backward", sdpa_part),
        "unet": ("SD1.5 U-Net training step (bf16 autocast, fused AdamW)",
                 lambda: unet_part(args.cases.split(","), args.variants.split(","), args.iters, ceiling, measured)),
        "profile": ("Profile", lambda: profile_part(*args.profile.split("@"))),
        "vae": ("kl-f8 VAE encode / decode (bf16 autocast, no grad)",
                lambda: vae_part(args.iters, args.vae_cases.split(","), args.vae_variants.split(","))),
        "vae_train": ("VAE training step through Lightning (G + D, LPIPS, GAN on)",
                      lambda: vae_train_part(args.vae_train_rows.split(","))),
        "sampling": ("50 DDIM steps + CFG 7.5 + decode, 512 px, batch 8 (bf16)",
                     lambda: sampling_part(args.sampling_variants.split(","))),
        "sampling_profile": (f"Profile of sampling, {args.sampling_profile}",
                             lambda: sampling_profile_part(args.sampling_profile)),
        "train": (train_cmd, lambda: train_part(args.train_steps, extras, measured.get(args.bare))),
        "lora": ("LoRA training step, SD1.5 U-Net (bench.lora: bf16 autocast, fused AdamW on the trainable tensors)",
                 lambda: lora_part(args.lora_case, args.lora_variants.split(","), args.iters)),
        "train_profile": (f"Profile of {train_cmd} (the first --train-extras set)",
                          lambda: train_profile_part(args.train_steps, extras[0])),
    }
    print(f"bf16 matmul ceiling: {ceiling:.0f} TF/s", flush=True)
    for part in parts:
        if part == "ceiling":
            continue
        title, run = runners[part]
        print(f"== {part}", flush=True)
        try:
            table = run()
        except Exception:  # noqa: BLE001 — keep the other parts' results
            traceback.print_exc()
            continue
        sections += [f"#### {title}", "", table]
        print(table, flush=True)
    text = "\n".join(sections)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
