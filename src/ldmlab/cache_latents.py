"""Encode image shards into latent shards with a trained VAE, once, so LDM training never runs the encoder.

    python -m ldmlab.cache_latents vae=<.ckpt | vae.safetensors | SD ckpt | diffusers dir> out=<dir>
        [data=wds 'data.train_urls="/data/laion/{000000..000999}.tar"' data.decoder.image_size=256]
        [trainer=gpu trainer.devices=8] [sample=false] [batch_size=32]

`data=...`, `trainer=...` and `paths.*` compose exactly as for train.py (default: the demo data on the CPU);
the encoder runs in fp32 unless `trainer.precision=...` is given.
Each input shard becomes one output shard `{split}-%06d.tar` of `{key}.mean.npy` + `{key}.std.npy` (the
posterior's mean and std, float16) or, with sample=true, `{key}.latent.npy` (one seeded posterior sample),
plus the source's `.cls` / `.txt` / `.json`. Images get the DataModule's validation transform (resize shorter
side, centre crop). Resumable: finished shards are skipped (a shard appears under its final name only when
complete). Multi-GPU through Lightning Fabric: each rank encodes every world_size-th pending shard. Then
`data=wds_latents data.root=<out>` trains on the cache.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from lightning_fabric import Fabric
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ldmlab.configs import CONF_DIR
from ldmlab.data.cli import parse_args, split_args
from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.filters import BadSample, SampleCounter
from ldmlab.data.latents import MICRO, load_npy, npy_bytes
from ldmlab.data.module import ShardDataModule
from ldmlab.data.shards import MANIFEST, DataConfigError, read_segment, scan_count, shard_count
from ldmlab.data.tarstream import shard_samples
from ldmlab.data.transforms import normalize, to_batch
from ldmlab.validate import ConfigError
from ldmlab.validate.files import checkpoint_problems

log = logging.getLogger("ldmlab.cache_latents")
PLAN = "plan.json"


@dataclass
class CacheArgs:
    """Arguments of cache_latents that are not Hydra overrides."""

    vae: str = field(default=MISSING, metadata={"help": "VAE weights: VAEModule .ckpt, vae.safetensors, SD "
                                                        "checkpoint or diffusers directory"})
    out: str = field(default=MISSING, metadata={"help": "output directory of the latent shards"})
    splits: list[str] = field(default_factory=lambda: ["train", "val"], metadata={"help": "splits to encode"})
    sample: bool = field(default=False, metadata={"help": "store one posterior sample instead of mean and std"})
    batch_size: int = field(default=32, metadata={"help": "images per encoder call"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers that decode images"})
    seed: int = field(default=0, metadata={"help": "seed of the stored samples (sample=true)"})


@dataclass(frozen=True)
class Job:
    """One input shard and the output shard it becomes."""

    split: str
    index: int
    url: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


# ---------------------------------------------------------------- reading: whole shards, in order


class ShardBatches(IterableDataset):
    """Batches of whole input shards, in order, then an end-of-shard marker per shard (workers split shards)."""

    def __init__(self, jobs: Sequence[Job], decoder: ImageDecoder, batch_size: int,
                 counter: SampleCounter) -> None:
        self.jobs, self.decoder, self.batch_size, self.counter = list(jobs), decoder, batch_size, counter

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for job in self.jobs[worker::num_workers]:
            yield from self._shard(job)

    def _shard(self, job: Job) -> Iterator[dict]:
        """The decoded batches of one shard (bad samples skipped and counted), then {"end": True}.

        With buckets, each image is at its bucket's size and a batch holds one bucket (one shape per encoder call).
        """
        groups: dict[tuple, list] = {}
        start = 0
        for sample in read_segment(job.url, 0, None, self._shard_error):
            try:
                pixels, label, text, key, *micro = self.decoder(sample, None)
                # with buckets: [original H, W, crop top, left] (SDXL §2.2), stored beside the latent
                item = (pixels, label, text, key, sample.get("json"), [*micro[0], *micro[1]] if micro else None)
            except BadSample as bad:
                self.counter.bad(bad)
                continue
            self.counter.good()
            items = groups.setdefault(item[0].shape, [])
            items.append(item)
            if len(items) == self.batch_size:
                yield self._batch(job, groups.pop(item[0].shape), start)
                start += self.batch_size
        for items in groups.values():
            yield self._batch(job, items, start)
            start += len(items)
        yield {"shard": job.name, "index": job.index, "end": True}

    def _batch(self, job: Job, items: list, start: int) -> dict:
        images, labels, texts, keys, metas, micro = zip(*items)
        return {"image": to_batch(images, uint8=True), "label": list(labels), "text": list(texts),
                "key": list(keys), "json": list(metas), "micro": list(micro), "shard": job.name, "index": job.index,
                "start": start, "end": False}

    def _shard_error(self, url: str, error: Exception, missing: int | None) -> None:
        self.counter.bad(BadSample("shard", f"shard {url!r} ended early ({type(error).__name__}: {error})"))


# ---------------------------------------------------------------- writing: one output shard per input shard


class LatentShardWriter:
    """Appends encoded batches to `.{name}.tmp` and renames it to `{name}` when its shard is finished."""

    def __init__(self, out: Path, sample: bool, seed: int) -> None:
        self.out, self.sample, self.seed = out, sample, seed
        self.open: dict[str, wds.TarWriter] = {}
        self.shapes: dict[str, dict[str, int]] = {}  # per open shard: latent shape → samples (the manifest's buckets)

    def add(self, batch: dict, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Write one batch's latents (B, C, h, w) and metadata."""
        name = batch["shard"]
        if name not in self.open:
            self.open[name] = wds.TarWriter(str(self.out / f".{name}.tmp"), encoder=False, mtime=0)
        fields = self._latent_fields(batch, mean.float().cpu(), std.float().cpu())
        shapes, shape = self.shapes.setdefault(name, {}), json.dumps(list(mean.shape[1:]))
        shapes[shape] = shapes.get(shape, 0) + len(batch["key"])
        for i, key in enumerate(batch["key"]):
            sample = {"__key__": key, **{k: npy_bytes(v[i]) for k, v in fields.items()}}
            if batch["label"][i] >= 0:
                sample["cls"] = str(int(batch["label"][i])).encode()
            if batch["text"][i]:
                sample["txt"] = batch["text"][i].encode("utf-8")
            if batch["json"][i] is not None:
                sample["json"] = batch["json"][i]
            if batch["micro"][i] is not None:
                sample[MICRO] = npy_bytes(np.asarray(batch["micro"][i], np.int32))
            self.open[name].write(sample)

    def _latent_fields(self, batch: dict, mean: torch.Tensor, std: torch.Tensor) -> dict:
        """{"mean.npy": ..., "std.npy": ...} in float16, or {"latent.npy": mean + std·ε} with a seeded ε."""
        if not self.sample:
            return {"mean.npy": mean.half().numpy(), "std.npy": std.half().numpy()}
        # Seeded by (seed, shard, position): the same latents whichever rank or run encodes the shard.
        gen = torch.Generator().manual_seed((self.seed << 40) + (batch["index"] << 20) + batch["start"])
        return {"latent.npy": (mean + std * torch.randn(mean.shape, generator=gen)).half().numpy()}

    def finish(self, name: str) -> None:
        """Close the shard and give it its final name (only now does it count as done)."""
        tmp = self.out / f".{name}.tmp"
        (self.out / f"{name}.shapes.json").write_text(json.dumps(self.shapes.pop(name, {})) + "\n")
        if name in self.open:
            self.open.pop(name).close()
        else:  # no usable sample in the input shard: an empty output shard still marks it done
            wds.TarWriter(str(tmp), encoder=False).close()
        os.replace(tmp, self.out / name)


# ---------------------------------------------------------------- the run


def compose_config(overrides: Sequence[str], out: str) -> DictConfig:
    """conf/train.yaml composed with the command line's Hydra overrides (data=..., trainer=..., paths.*)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)  # not running under @hydra.main: no hydra:runtime.output_dir
        if not any(o.startswith("trainer.precision=") for o in overrides):
            cfg.trainer.precision = "32-true"  # encoded once, trained on for long: full precision by default
    return cfg


def make_fabric(trainer: DictConfig) -> Fabric:
    """Fabric with the trainer config's accelerator, devices, nodes, precision and (DDP) strategy."""
    strategy = str(trainer.get("strategy", "auto"))
    return Fabric(accelerator=trainer.get("accelerator", "auto"), devices=trainer.get("devices", "auto"),
                  num_nodes=trainer.get("num_nodes", 1), precision=trainer.get("precision", "32-true"),
                  strategy="ddp" if strategy.startswith("ddp") else strategy)


def plan_jobs(dm: ShardDataModule, splits: Sequence[str]) -> list[Job]:
    """One job per input shard of each split, in the DataModule's url order."""
    jobs = []
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"splits lists {split!r}: use train and/or val")
        urls = [u for s in dm.train_sources() for u in s] if split == "train" else dm.val_url_list() or []
        jobs += [Job(split, i, url) for i, url in enumerate(urls)]
    return jobs


def check_plan(out: Path, plan: dict) -> None:
    """Check that plan.json in `out` (written by this run or an interrupted earlier one) is this run's plan."""
    old = json.loads((out / PLAN).read_text())
    if old != plan:
        diff = sorted(k for k in plan if old.get(k) != plan[k])
        raise ValueError(f"out={out} holds a cache made with different {diff}: choose another out, or "
                         f"delete it to start over")


def write_manifest(out: Path, jobs: Sequence[Job], plan: dict, dm: ShardDataModule) -> dict:
    """manifest.json of the finished cache: per-shard counts (loader epoch length) and latent shape."""
    counts = {j.name: scan_count(str(out / j.name)) for j in jobs}
    splits = {s: {"samples": sum(c for n, c in counts.items() if n.startswith(f"{s}-")),
                  "shards": sum(n.startswith(f"{s}-") for n in counts)} for s in {j.split for j in jobs}}
    first = next((out / n for n, c in counts.items() if c), None)
    shape = None
    if first is not None:
        sample = next(shard_samples(str(first)))
        shape = list(load_npy(sample.get("mean.npy", sample.get("latent.npy"))).shape)
    manifest = {"format": 1, "kind": "latents", **plan, "latent_shape": shape, "classes": dm.class_names,
                "splits": splits, "counts": counts}
    if dm.decoder.bucket_sizes is not None:
        manifest.update(bucket_manifest(out, jobs))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if dm.class_names:
        (out / "classes.json").write_text(json.dumps(dm.class_names, indent=1) + "\n")
    return manifest


def bucket_manifest(out: Path, jobs: Sequence[Job]) -> dict:
    """{"buckets": [[C, h, w], ...], "bucket_counts": {split: [samples per bucket]}} from the shards' shapes files
    (data=wds_latents weights its bucket schedule with the train counts)."""
    per_split: dict[str, dict[str, int]] = {}
    for job in jobs:
        split = per_split.setdefault(job.split, {})
        for shape, n in json.loads((out / f"{job.name}.shapes.json").read_text()).items():
            split[shape] = split.get(shape, 0) + n
    shapes = sorted({s for split in per_split.values() for s in split}, key=json.loads)
    return {"buckets": [json.loads(s) for s in shapes],
            "bucket_counts": {name: [split.get(s, 0) for s in shapes] for name, split in per_split.items()}}


def encode_jobs(fabric: Fabric, jobs: Sequence[Job], dm: ShardDataModule,
                args: CacheArgs) -> SampleCounter:
    """Encode this rank's shards with a progress bar (rank 0's); returns the bad-sample counter."""
    from ldmlab.convert.load import load_vae

    vae = load_vae(args.vae).to(fabric.device).requires_grad_(False)
    counter = SampleCounter(dm.stream.max_bad_fraction, dm.stream.bad_check_after)
    loader = DataLoader(ShardBatches(jobs, dm.make_decoder(train=False), args.batch_size, counter),
                        batch_size=None, num_workers=args.num_workers)
    writer = LatentShardWriter(Path(args.out), args.sample, args.seed)
    total = sum(shard_count(j.url) or 0 for j in jobs) or None
    bar = tqdm(total=total, unit="img", desc="encoding", disable=fabric.global_rank != 0, file=sys.stderr)
    with bar:
        for batch in loader:
            if batch["end"]:
                writer.finish(batch["shard"])
                continue
            with torch.inference_mode(), fabric.autocast():
                posterior = vae.encode(normalize(batch["image"].to(fabric.device)))  # uint8 → [-1, 1] on device
            writer.add(batch, posterior.mean, posterior.std)
            bar.update(len(batch["key"]))
    return counter


def cache_latents(args: CacheArgs, cfg: DictConfig) -> Path:
    """Encode every pending shard of `cfg.data`'s splits into `args.out` and write its manifest."""
    out = Path(args.out).expanduser()
    fabric = make_fabric(cfg.trainer)
    fabric.launch()
    dm = hydra.utils.instantiate(cfg.data)
    if not isinstance(dm, ShardDataModule) or not isinstance(dm.decoder, ImageDecoder):
        raise DataConfigError(f"data.decoder={type(getattr(dm, 'decoder', dm)).__name__} does not decode images: "
                              f"use data=wds, demo or folder")
    if fabric.local_rank == 0:
        dm.prepare_data()  # e.g. the demo builds its shards
        out.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    jobs = plan_jobs(dm, args.splits)
    plan = {"vae": str(Path(args.vae).resolve()), "image_size": dm.decoder.image_size,
            "mode": "sample" if args.sample else "mean_std", "seed": args.seed,
            "sources": {j.name: j.url for j in jobs}}
    if dm.decoder.bucket_sizes is not None:
        plan["buckets"] = [list(s) for s in dm.decoder.bucket_sizes]
    if fabric.global_rank == 0 and not (out / PLAN).is_file():
        (out / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    fabric.barrier()
    check_plan(out, plan)  # on every rank, so a mismatch stops all of them instead of hanging the others
    pending = [j for j in jobs if not (out / j.name).is_file()]
    if fabric.global_rank == 0:
        log.info("%d of %d shards already cached; encoding %d on %d rank(s)", len(jobs) - len(pending),
                 len(jobs), len(pending), fabric.world_size)
    mine = pending[fabric.global_rank::fabric.world_size]
    counter = encode_jobs(fabric, mine, dm, args)
    log.info("rank %d: encoded %d shards, %s", fabric.global_rank, len(mine), counter.describe())
    fabric.barrier()
    if fabric.global_rank == 0:
        write_manifest(out, jobs, plan, dm)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: cache_latents' own key=value arguments, the rest are Hydra overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, overrides = split_args(CacheArgs, argv)
    args = parse_args(CacheArgs, mine + [a for a in overrides if a in ("-h", "--help")], __doc__)
    if problems := checkpoint_problems("vae", args.vae, "VAE weights (.ckpt, vae.safetensors, diffusers dir)"):
        raise ConfigError(problems)  # before Fabric starts or any shard is read: missing or code-carrying file
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose_config(overrides, args.out)
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg.data))
    return cache_latents(args, cfg)


if __name__ == "__main__":
    main()
