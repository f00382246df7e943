"""Latent shards: the format `ldmlab.cache_latents` writes, and `LatentDecoder`, how `data=wds_latents` reads them.

A sample is `{key}.mean.npy` + `{key}.std.npy` (the VAE posterior's mean and std, (C, h, w) float16) or
`{key}.latent.npy` (one posterior sample, float16), plus the source's `.cls` / `.txt` / `.json`; a bucketed cache
adds `{key}.micro.npy` (original size and crop offset, batched as `original_size`, `crop_top_left`). Batches carry
RAW latents: the LDM module multiplies by its latent scale factor itself (EDM2: raw latents offline, scaled
just in time), so one cache serves any scale factor.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ldmlab.data.decoders import Fields, where
from ldmlab.data.filters import BadSample
from ldmlab.data.transforms import batch_buffer

LATENT_FIELDS = ("mean.npy", "std.npy", "latent.npy")
MICRO = "micro.npy"  # bucketed caches: [original H, W, crop top, left] int32 of the encoded crop (SDXL §2.2)


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` serialised as .npy (self-describing: dtype and shape travel with the bytes)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_shape(data: bytes, where: str) -> tuple[int, ...]:
    """The shape in a .npy header, without reading the array; BadSample when it is no .npy."""
    try:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])
    except ValueError as e:
        raise BadSample("undecodable", f"{where}: .npy header does not parse ({e})") from None


def load_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes (pickles refused: loading never executes code from a file)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class LatentDecoder:
    """Raw latent sample → (mean, std or None, label, text, key); collate draws mean + std·ε (seeded)."""

    sample_posterior: bool = True  # latent = mean + std·ε (ε seeded per rank, worker, epoch); false: the mean
    label_key: str | None = "cls"
    text_key: str | None = "txt"
    required: Sequence[str] = ()
    shape: Sequence[int] | None = None  # (C, h, w); None: the cache's manifest, else a worker's first sample
    buckets: Sequence[Sequence[int]] | None = None  # (C, h, w) per bucket: a bucketed cache's manifest
    bucket_weights: list[float] | None = None  # samples per bucket (the manifest's): the schedule's weights

    reshapes = False  # a latent stays at its cached shape: a short bucket is never filled from another

    def __post_init__(self) -> None:
        self.fields = Fields(self.label_key, self.text_key, list(self.required))
        self.shape = tuple(self.shape) if self.shape is not None else None
        self.buckets = [tuple(b) for b in self.buckets] if self.buckets else None

    @property
    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The buckets' latent (h, w), or None: one latent shape."""
        return [b[-2:] for b in self.buckets] if self.buckets else None

    def for_stream(self, train: bool, on_device: bool = False, manifest: dict | None = None) -> LatentDecoder:
        """This decoder with the latent shape (or the buckets and their counts) of the cache's manifest.json, so
        every worker checks the same."""
        manifest = manifest or {}
        if manifest.get("buckets") and self.buckets is None:
            counts = manifest.get("bucket_counts", {}).get("train" if train else "val")
            return replace(self, buckets=manifest["buckets"], bucket_weights=counts if counts and any(counts) else None)
        shape = manifest.get("latent_shape")
        return replace(self, shape=shape) if shape and self.shape is None else replace(self)

    def with_buckets(self, sizes: Sequence[tuple[int, int]] | None) -> LatentDecoder:
        """This decoder restricted to the buckets of latent (h, w) in `sizes` (None: one latent shape)."""
        keep = None if sizes is None else [b for b in self.buckets if tuple(b[-2:]) in {tuple(s) for s in sizes}]
        return replace(self, buckets=keep, bucket_weights=None)

    def bucket_of(self, sample: dict) -> tuple[int, None]:
        """The bucket of a raw sample from its .npy header alone; BadSample when no bucket has its shape."""
        name = "mean.npy" if "mean.npy" in sample else "latent.npy"
        if name not in sample:
            self._arrays(sample)  # raises the one-line "has no latent"
        self.fields(sample)
        shape = npy_shape(sample[name], where(sample))
        if shape not in self.buckets:
            raise BadSample("shape", f"{where(sample)}: latent shape {shape} is none of the cache's buckets "
                                     f"{self.buckets}")
        return self.buckets.index(shape), None

    def on_device(self, batch: dict) -> dict:
        """Nothing left to do: latents travel as float32."""
        return batch

    def __call__(self, sample: dict, rng: random.Random | None, bucket: int | None = None) -> tuple:
        """(mean, std or None, label, text, key) of a raw sample; BadSample when it is unusable."""
        mean, std = self._arrays(sample)
        if self.buckets is not None:  # any bucket's shape; the stream groups them
            self.bucket_of(sample)
        elif self.shape is None:
            self.shape = mean.shape  # no manifest shape: the first sample of this worker sets it
        if (self.buckets is None and mean.shape != self.shape) or (std is not None and std.shape != mean.shape):
            raise BadSample("shape", f"{where(sample)}: latent shape {mean.shape} (std "
                                     f"{None if std is None else std.shape}) differs from {self.shape}")
        label, text = self.fields(sample)
        item = (mean, std, label, text, sample["__key__"])
        return (*item, load_npy(sample[MICRO])) if MICRO in sample else item

    def _arrays(self, sample: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """(mean or stored sample, std or None) of a raw sample."""
        name = "mean.npy" if "mean.npy" in sample else "latent.npy"
        if name not in sample:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise BadSample("missing", f"{where(sample)} has no latent (expected .mean.npy + .std.npy or "
                                       f".latent.npy, found {found}): is this a cache_latents shard?")
        if name == "mean.npy" and "std.npy" not in sample:
            raise BadSample("missing", f"{where(sample)} has .mean.npy but no .std.npy")
        try:
            mean = load_npy(sample[name])
            std = load_npy(sample["std.npy"]) if name == "mean.npy" else None
        except ValueError as e:
            raise BadSample("undecodable", f"{where(sample)}: .{name} does not load ({e})") from None
        return mean, std

    def collate(self, items: list, rng: random.Random) -> dict:
        """Items → {"latent": (B,C,h,w) float32 raw, "label": (B,) int64, "text": [str], "key": [str]}."""
        means, stds, labels, texts, keys, *micro = zip(*items)
        latent = batch_buffer((len(means), *means[0].shape), torch.float32)
        np.stack(means, out=latent.numpy(), casting="same_kind")  # float16 → float32
        if self.sample_posterior and any(s is not None for s in stds):
            std = torch.from_numpy(np.stack([np.zeros_like(m) if s is None else s
                                             for m, s in zip(means, stds)]))
            eps = torch.randn(latent.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
            latent.addcmul_(std.float(), eps)  # mean + std·ε, in place in the (shared) batch buffer
        batch = {"latent": latent, "label": torch.tensor(labels, dtype=torch.int64), "text": list(texts),
                 "key": list(keys)}
        if micro:  # a bucketed cache: the image path's micro-conditioning, as ImageDecoder batches it
            sizes = torch.from_numpy(np.stack(micro[0])).long()
            batch["original_size"], batch["crop_top_left"] = sizes[:, :2], sizes[:, 2:]
        return batch
