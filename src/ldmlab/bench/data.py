"""Data-loader throughput: our image pipeline against a bare PIL decode of the same JPEGs; the latent loader.

    python -m ldmlab.bench.data [n=2000] [size=256] [repeats=5] [write=true]

Images: random crops of the photographs bundled with scikit-image/-learn, resized so the shorter side is
`size`, saved as JPEG files (quality 90) and sharded by make_shards. Per worker (one process, no DataLoader
workers), timed batch by batch in turn for `repeats` × n samples each:
* bare: `Image.open(f).convert("RGB")` over the JPEG files (torchvision's `pil_loader`),
* ours: shards → tar parsing → shuffle → decode → resize shorter side → random crop → flip → batch (uint8, as
  a Trainer gets it; and with the float32 [-1, 1] conversion in the worker, as without a Trainer),
* latents: cache_latents-format shards (kl-f8 mean + std, fp16 4×(size/8)²) → mean + std·ε batches,
and the same pipelines through a DataLoader with `workers` processes. write=true puts the table under
`## Data loader` in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
import torch
import webdataset as wds
from PIL import Image, features

from ldmlab.data.cli import parse_args
from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.demo import class_names, load_photo
from ldmlab.data.latents import LatentDecoder, npy_bytes
from ldmlab.data.make_shards import MakeShardsArgs, make_shards
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader

DOC = Path(__file__).resolve().parents[3] / "docs" / "BENCHMARKS.md"
HEADING = "## Data loader"


@dataclass
class BenchArgs:
    """Arguments of the data-loader benchmark."""

    n: int = field(default=2000, metadata={"help": "images (and latents) per pass"})
    size: int = field(default=256, metadata={"help": "shorter side of the JPEGs = crop size"})
    repeats: int = field(default=5, metadata={"help": "epochs' worth of samples timed per pipeline"})
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
        crop = Image.fromarray(photo[y:y + side, x:x + side])
        crop = crop.resize((round(size * aspect), size), Image.Resampling.BICUBIC)
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


def bare_decode(paths: list[Path], chunk: int) -> Iterator[int]:
    """The bare PIL loop (torchvision's `pil_loader`), `chunk` files at a time, cycling over the files."""
    for start in itertools.count(0, chunk):
        for i in range(start, start + chunk):
            with open(paths[i % len(paths)], "rb") as f:
                Image.open(f).convert("RGB")
        yield chunk


def batches(dm: ShardDataModule, workers: int, uint8: bool = False) -> Iterator[int]:
    """Batch sizes of a DataModule's training stream, epoch after epoch.

    uint8=True: the batches a Trainer gets (pixels normalised later, on the device).
    """
    loader = EpochLoader(dm.make_train_set(on_device=uint8), num_workers=workers)
    while True:
        for batch in loader:
            yield len(batch["key"])


def measure(pipelines: dict[str, Iterator[int]], samples: int) -> dict[str, float]:
    """samples/s of each pipeline, timed chunk by chunk in turn (one batch each) until each did `samples`.

    Interleaving at the scale of a batch pairs the measurements in time, so load from other processes on a
    shared machine slows every pipeline alike instead of whichever ran during a busy second.
    """
    for chunks in pipelines.values():  # warm-up: workers started, shuffle buffers full, files cached
        for _ in range(3):
            next(chunks)
    done = dict.fromkeys(pipelines, 0)
    spent = dict.fromkeys(pipelines, 0.0)
    while min(done.values()) < samples:
        for name, chunks in pipelines.items():
            start = time.perf_counter()
            done[name] += next(chunks)
            spent[name] += time.perf_counter() - start
    return {name: done[name] / spent[name] for name in pipelines}


def environment() -> str:
    """Device, versions and date, one line."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "?")
    jpeg = (f"libjpeg-turbo {features.version('libjpeg_turbo')}" if features.check_feature("libjpeg_turbo")
            else "libjpeg")
    return (f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores shared with other jobs (load average "
            f"{os.getloadavg()[0]:.1f} at start), Python {platform.python_version()}, torch {torch.__version__}, "
            f"Pillow {PIL.__version__} ({jpeg}), numpy {np.__version__}, webdataset {wds.__version__}")


def run_benchmark(args: BenchArgs, tmp: Path) -> tuple[dict[str, dict[str, float]], str]:
    """All measurements; ({"per worker" | "loader": {row: samples/s}}, environment line)."""
    env = environment()
    paths = make_jpegs(tmp / "jpeg", args.n, args.size)
    make_shards(MakeShardsArgs(src=str(tmp / "jpeg"), out=str(tmp / "shards"), max_count=500))
    make_latent_shards(tmp / "latents", args.n, (4, args.size // 8, args.size // 8))
    stream = {"batch_size": args.batch_size, "shuffle_buffer": 1000}

    def images() -> ShardDataModule:
        decoder = ImageDecoder(args.size, random_crop=True, random_flip=True)
        return ShardDataModule(root=str(tmp / "shards"), decoder=decoder, **stream)

    def latents() -> ShardDataModule:
        return ShardDataModule(root=str(tmp / "latents"), decoder=LatentDecoder(), **stream)

    torch.set_num_threads(1)  # one core per worker, as DataLoader workers run
    total = args.n * args.repeats
    per_worker = measure({"bare decode": bare_decode(paths, args.batch_size),
                          "ours": batches(images(), 0, uint8=True),
                          "ours, float32 in worker": batches(images(), 0),
                          "latents": batches(latents(), 0)}, total)
    loaders = measure({"ours": batches(images(), args.workers, uint8=True),
                       "latents": batches(latents(), args.workers)}, total // 2)
    return {"per worker": per_worker, "loader": loaders}, env


def table(results: dict[str, dict[str, float]], args: BenchArgs, env: str) -> str:
    """The markdown section for docs/BENCHMARKS.md."""
    bare = results["per worker"]["bare decode"]
    command = (f"`python -m ldmlab.bench.data n={args.n} size={args.size} repeats={args.repeats} "
               f"batch_size={args.batch_size} workers={args.workers}`")
    lines = [HEADING, "", f"{command} — {env}.", "",
             "| pipeline | processes | samples/s | per worker | per worker vs bare decode |",
             "|---|---:|---:|---:|---:|"]
    for kind, procs in (("per worker", 1), ("loader", args.workers)):
        for name, value in results[kind].items():
            vs = f"{value / procs / bare:.0%}" if not name.startswith(("bare", "latents")) else ""
            lines.append(f"| {name} | {procs} | {value:,.0f} | {value / procs:,.0f} | {vs} |")
    notes = (
        f"*bare decode*: `Image.open(f).convert('RGB')` (torchvision's `pil_loader`) over the {args.n} JPEG "
        f"files (shorter side {args.size}, aspect 1-1.5). *ours*: make_shards tar shards → tar parsing → "
        f"shuffle buffer → decode → resize shorter side → random crop {args.size}² → random flip → batches of "
        f"{args.batch_size} as a Trainer gets them: uint8, normalised to [-1, 1] on the device "
        "(on_after_batch_transfer). *ours, float32 in worker*: the same with the [-1, 1] float conversion in "
        "the worker (loaders used without a Trainer). *latents*: cache_latents-format shards (fp16 mean + std, "
        f"4×{args.size // 8}²) → mean + std·ε float32 batches. Pipelines are timed batch by batch in turn, "
        "which pairs their timings on a shared machine; one core per process. The multi-worker rows share "
        "the cores with the main process and other jobs, so they are noisy here.")
    return "\n".join([*lines, "", notes, ""])


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
