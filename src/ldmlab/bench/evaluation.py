"""The cost of `python -m ldmlab.evaluate` on an SD1.5-size text model (issue 19's speed row), timed as users run it.

    python -m ldmlab.bench.evaluation [--latent 64] [--n 64,320] [--steps 50] [--guidance 7.5] [--out docs/BENCHMARKS.md]

Random weights stand in for the ones that cannot be downloaded (same shapes, same work): SD1.5's U-Net trained
for one step by `train.py model=unet_sd15` (so the checkpoint is the real thing), SD's kl-f8 VAE, a CLIP text
encoder of SD's width and the FID Inception-v3. The evaluation's sampling, decoding, feature and metric stages run
as they do for real weights. Two calls of n1 < n2 samples give the per-sample time and the fixed cost (start,
loading, compilation); the 5,000-sample time is extrapolated from them (stated as such in the table). Counts below
FID's minimum for 2048 features (2049) time KID, IS and precision/recall.
`--extra` shrinks the model for a rehearsal on the CPU (`--latent 8 --n 20,40 --steps 2 --vae-channels 32 --extra
model.unet.model_channels=32 model.unet.channel_mult=[1,2] model.unet.attention_levels=[1] trainer=cpu`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldmlab.bench.train_path import REPO
from ldmlab.lit.weights import save_weights
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.inception import FIDInceptionV3
from ldmlab.utils.stand_ins import make_tiny_clip

# SD's first stage (conf/model/vae_kl_f8.yaml), REFERENCE.md
SD_VAE = {"in_channels": 3, "out_channels": 3, "base_channels": 128, "channel_mult": [1, 2, 4, 4],
          "num_res_blocks": 2, "z_channels": 4, "embed_dim": 4, "attn_levels": [], "mid_attention": True,
          "dropout": 0.0, "norm_groups": 32}


def make_assets(tmp: Path, vae_config: dict) -> dict[str, Path]:
    """Random-weight stand-ins: CLIP text encoder (768 wide), a VAE, the FID Inception-v3, a prompt list."""
    torch.manual_seed(0)
    vae = save_weights(tmp / "vae.safetensors", AutoencoderKL(**vae_config).state_dict(), vae_config, "vae")
    inception = tmp / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().state_dict(), inception)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(["lowest newer", "wider lower", "newer lowest wider"] * 100))
    return {"clip": make_tiny_clip(tmp / "clip768", hidden_size=768), "vae": vae, "inception": inception,
            "prompts": prompts}


def run(cmd: list[str], what: str, cache_dir: Path | None = None) -> float:
    """Run `cmd` in the repository; its wall time in seconds, or the tail of its log on failure. `cache_dir`: a
    fresh inductor cache, so this process compiles from scratch like the others (a shared cache made the second
    of two timed processes 15 s faster than the first at 5× the samples, 2026-12-03)."""
    env = {**os.environ, **({"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)} if cache_dir else {})}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
    print((proc.stdout + proc.stderr)[-1500:], flush=True)
    return time.perf_counter() - t0


def make_checkpoint(tmp: Path, assets: dict[str, Path], latent: int, reference_n: int, extra: list[str]) -> Path:
    """One training step of `train.py model=unet_sd15` on random latents of the evaluated size: a real checkpoint
    whose stored data config (its validation pool) is the evaluation's reference."""
    run([sys.executable, "train.py", "model=unet_sd15", "data=synthetic_latents", f"data.shape=[4,{latent},{latent}]",
         f"data.val_samples={reference_n}", "data.batch_size=2", f"model.vae.path={assets['vae']}",
         f"model.conditioner.path={assets['clip']}", "speed=none", "trainer.max_steps=1",
         "trainer.limit_val_batches=0", "callbacks.export_weights=null", "callbacks.image_grids=null",
         "callbacks.ema=null", f"hydra.run.dir={tmp}/run", *extra], "train.py (checkpoint)")
    return next((tmp / "run").rglob("last.ckpt"))


def evaluate_once(tmp: Path, ckpt: Path, assets: dict[str, Path], n: int, steps: int, guidance: float,
                  batch: int) -> float:
    """Wall time of one `ldmlab.evaluate` process: one guidance scale, n samples, n reference images."""
    metrics = "[fid,kid,is,precision,recall]" if n > 2048 else "[kid,is,precision,recall]"
    return run([sys.executable, "-m", "ldmlab.evaluate", f"ckpt={ckpt}", f"guidance={guidance}", f"n={n}",
                "sampler=ddim", f"steps={steps}", f"batch_size={batch}", "ema=false", "features.name=inception",
                f"features.path={assets['inception']}", f"metrics={metrics}", f"prompts={assets['prompts']}",
                f"out={tmp}/eval_{n}"], f"ldmlab.evaluate n={n}", cache_dir=tmp / f"inductor_{n}")


def time_evaluation(latent: int, counts: tuple[int, int], steps: int, guidance: float, batch: int,
                    extra: list[str], vae_config: dict) -> dict[str, float]:
    """Two evaluations of n1 < n2 samples: the per-sample slope and the fixed cost (start, load, compile)."""
    n1, n2 = counts
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        assets = make_assets(tmp, vae_config)
        ckpt = make_checkpoint(tmp, assets, latent, n2, extra)
        w1, w2 = (evaluate_once(tmp, ckpt, assets, n, steps, guidance, batch) for n in (n1, n2))
    slope = (w2 - w1) / (n2 - n1)
    return {"n1": n1, "n2": n2, "w1": w1, "w2": w2, "s_per_sample": slope, "fixed_s": w1 - slope * n1}


def report(r: dict[str, float], args: argparse.Namespace) -> str:
    """Markdown: the measured call and the 5,000-sample time extrapolated from it."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    pixels = args.latent * 8
    head = (f"### `ldmlab.evaluate`, SD1.5-size text model at {pixels} px ({device}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')})\n\n    python -m ldmlab.bench.evaluation --latent {args.latent} --n {args.n} "
            f"--steps {args.steps} --guidance {args.guidance} --batch {args.batch}\n\n")
    measured = ("measured: one `ldmlab.evaluate` process, one guidance scale (start, load, compile, sampling, "
                "decode, Inception features of samples and reference, metrics)")
    rows = ["| what | samples | DDIM steps | wall s |", "|---|---|---|---|",
            *(f"| {measured} | {r[n]} | {args.steps} | {r[w]:.0f} |" for n, w in (("n1", "w1"), ("n2", "w2"))),
            f"| per sample (the slope between the two) | 1 | {args.steps} | {r['s_per_sample']:.3f} |",
            f"| fixed cost (start, load, compile, metrics) | – | – | {r['fixed_s']:.0f} |",
            (f"| **extrapolated: 5,000 samples** (fixed + 5000 × slope; FID's 2048-d statistics add a few s) | "
             f"5000 | {args.steps} | {r['fixed_s'] + 5000 * r['s_per_sample']:.0f} |")]
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px images)")
    parser.add_argument("--n", default="64,320", help="two sample counts n1,n2: slope and fixed cost")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="train.py overrides (a smaller U-Net for a rehearsal)")
    parser.add_argument("--vae-channels", type=int, default=128, help="the VAE's base width (SD: 128)")
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    n1, n2 = map(int, args.n.split(","))
    result = time_evaluation(args.latent, (n1, n2), args.steps, args.guidance, args.batch, args.extra,
                             {**SD_VAE, "base_channels": args.vae_channels})
    text = report(result, args)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
