"""Data-loader throughput: our image pipeline against a bare PIL decode of the same JPEGs, and the latent loader.

    python -m ldmlab.bench.data [n=2000] [size=256] [repeats=5] [write=true]

Images: random crops of the photographs bundled with scikit-image/-learn, resized so the shorter side is
`size`, saved as JPEG files (quality 90) and sharded by make_shards. Per worker (one process, no DataLoader
workers) it times, interleaved and repeated, the median of:
* bare: `Image.open(path).convert("RGB")` + `load()` over the JPEG files,
* ours: shards → tar parsing → decode → resize shorter side → random crop → flip → [-1, 1] tensor → batch,
* latents: cache_latents-format shards (kl-f8 mean + std, fp16 4×(size/8)²) → mean + std·ε batches,
and the same pipelines through a DataLoader with `workers` processes. write=true puts the table under
`## Data loader` in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image, features

from ldmlab.data.cli import parse_args
from ldmlab.data.demo import class_names, load_photo
from ldmlab.data.latents import LatentDataModule, npy_bytes
from ldmlab.data.make_shards import MakeShardsArgs, make_shards
from ldmlab.data.pipeline import EpochLoader
from ldmlab.data.wds import WebDatasetDataModule

DOC = Path(__file__).resolve().parents[3] / "docs" / "BENCHMARKS.md"
HEADING = "## Data loader"


@dataclass
class BenchArgs:
    """Arguments of the data-loader benchmark."""

    n: int = field(default=2000, metadata={"help": "images (and latents) per pass"})
    size: int = field(default=256, metadata={"help": "shorter side of the JPEGs = crop size"})
    repeats: int = field(default=5, metadata={"help": "interleaved passes per pipeline (median reported)"})
    batch_size: int = field(default=64, metadata={"help": "batch size of our pipelines"})
    workers: int = field(default=2, metadata={"help": "DataLoader workers for the multi-process rows"})
    write: bool = field(default=False, metadata={"help": "write the results into docs/BENCHMARKS.md"})


def make_jpegs(directory: Path, n: int, size: int) -> list[Path]:
    """`n` JPEGs with shorter side `size` and random aspect 1-1.5, cut from the bundled photographs."""
    rng = np.random.default_rng(0)
    photos = [load_photo(name) for name in class_names()]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.5, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        aspect = rng.uniform(1.0, 1.5)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((round(size * aspect), size), Image.BICUBIC)
        (directory / f"c{i % len(photos)}").mkdir(parents=True, exist_ok=True)
        paths.append(directory / f"c{i % len(photos)}" / f"{i:06d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def make_latent_shards(directory: Path, n: int, shape: tuple[int, int, int], per_shard: int = 500) -> None:
    """Shards in cache_latents' format (random fp16 mean/std) and their manifest."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for k in range(0, n, per_shard):
        name = f"train-{k // per_shard:06d}.tar"
        with wds.TarWriter(str(directory / name), encoder=False) as sink:
            for i in range(k, min(n, k + per_shard)):
                mean = rng.standard_normal(shape).astype(np.float16)
                std = rng.uniform(0.01, 0.1, shape).astype(np.float16)
                sink.write({"__key__": f"{i:06d}", "mean.npy": npy_bytes(mean), "std.npy": npy_bytes(std),
                            "cls": str(i % 10).encode()})
        counts[name] = min(n, k + per_shard) - k
    (directory / "manifest.json").write_text(json.dumps({"counts": counts, "latent_shape": list(shape)}))


def bare_decode(paths: list[Path]) -> Callable[[], int]:
    """One pass of the bare PIL loop: decode every file to RGB pixels."""
    def run() -> int:
        for p in paths:
            image = Image.open(p)
            image = image.convert("RGB") if image.mode != "RGB" else image
            image.load()
        return len(paths)
    return run


def stream_pass(dm, workers: int, uint8: bool = False) -> Callable[[], int]:
    """One training epoch of a DataModule's stream; returns the samples it yielded.

    uint8=True: the batches a Trainer gets (pixels normalised later, on the device).
    """
    dm.uint8_transfer = uint8
    stream = dm.make_train_set()
    loader = EpochLoader(stream, num_workers=workers)

    def run() -> int:
        return sum(len(b["key"]) for b in loader)
    return run


def rate(run: Callable[[], int]) -> float:
    """Samples per second of one pass."""
    start = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - start)


def measure(pipelines: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Median samples/s of each pipeline over `repeats` interleaved passes (after one warm-up pass each)."""
    for run in pipelines.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, run in pipelines.items():
            rates[name].append(rate(run))
    return {name: statistics.median(r) for name, r in rates.items()}


def environment() -> str:
    """Device, versions and date, one line."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    turbo = "libjpeg-turbo " + str(features.version("libjpeg_turbo")) if features.check_feature("libjpeg_turbo") else "libjpeg"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores (load avg {load:.1f} at start), "
            f"Python {platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__} ({turbo}), "
            f"webdataset {wds.__version__ if hasattr(wds, '__version__') else '?'}")


def run_benchmark(args: BenchArgs, tmp: Path) -> tuple[dict[str, dict[str, float]], str]:
    """All measurements; ({"per worker" | "loader": {row: samples/s}}, environment line)."""
    env = environment()
    paths = make_jpegs(tmp / "jpeg", args.n, args.size)
    make_shards(MakeShardsArgs(src=str(tmp / "jpeg"), out=str(tmp / "shards"), max_count=500))
    make_latent_shards(tmp / "latents", args.n, (4, args.size // 8, args.size // 8))
    images = dict(root=str(tmp / "shards"), image_size=args.size, random_crop=True, random_flip=True,
                  batch_size=args.batch_size, shuffle_buffer=1000)
    latents = dict(root=str(tmp / "latents"), batch_size=args.batch_size, shuffle_buffer=1000)
    torch.set_num_threads(1)  # one core per worker, as DataLoader workers run
    per_worker = measure({"bare decode": bare_decode(paths),
                          "ours": stream_pass(WebDatasetDataModule(**images), 0, uint8=True),
                          "ours, float32 in worker": stream_pass(WebDatasetDataModule(**images), 0),
                          "latents": stream_pass(LatentDataModule(**latents), 0)}, args.repeats)
    loaders = measure({"ours": stream_pass(WebDatasetDataModule(**images), args.workers, uint8=True),
                       "latents": stream_pass(LatentDataModule(**latents), args.workers)}, max(1, args.repeats // 2))
    return {"per worker": per_worker, "loader": loaders}, env


def table(results: dict[str, dict[str, float]], args: BenchArgs, env: str) -> str:
    """The markdown section for docs/BENCHMARKS.md."""
    bare = results["per worker"]["bare decode"]
    lines = [HEADING, "", f"`python -m ldmlab.bench.data n={args.n} size={args.size} repeats={args.repeats} "
             f"batch_size={args.batch_size} workers={args.workers}` — {env}.", "",
             "| pipeline | processes | samples/s | per worker | per worker vs bare decode |", "|---|---:|---:|---:|---:|"]
    for kind, procs in (("per worker", 1), ("loader", args.workers)):
        for name, value in results[kind].items():
            vs = f"{value / procs / bare:.0%}" if not name.startswith(("bare", "latents")) else ""
            lines.append(f"| {name} | {procs} | {value:,.0f} | {value / procs:,.0f} | {vs} |")
    lines += ["", f"*bare decode*: `Image.open(path).convert('RGB')` + `load()` over the {args.n} JPEG files "
              f"(shorter side {args.size}). *ours*: make_shards tar shards → tar parsing → shuffle buffer → decode "
              f"→ resize shorter side → random crop {args.size}² → random flip → batches of {args.batch_size}, "
              "as a Trainer gets them: uint8, normalised to [-1, 1] on the device (on_after_batch_transfer). "
              "*ours, float32 in worker*: the same with the float conversion in the worker (loaders used "
              f"without a Trainer). *latents*: cache_latents-format shards (fp16 mean + std, 4×{args.size // 8}²) "
              "→ mean + std·ε float32 batches. Medians of interleaved passes, one core per process; the "
              f"{args.workers}-worker rows share the cores with the main process and whatever else runs.", ""]
    return "\n".join(lines)


def write_section(section: str, path: Path = DOC) -> None:
    """Replace (or append) the `## Data loader` section of BENCHMARKS.md, keeping other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(HEADING)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark, print the table, write it into docs/BENCHMARKS.md with write=true."""
    args = parse_args(BenchArgs, list(sys.argv[1:] if argv is None else argv), __doc__)
    with tempfile.TemporaryDirectory(prefix="ldmlab-bench-") as tmp:
        results, env = run_benchmark(args, Path(tmp))
    section = table(results, args, env)
    print(section)
    if args.write:
        write_section(section)
    return results


if __name__ == "__main__":
    main()
