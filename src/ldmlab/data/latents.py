"""Latent shards: the format `ldmlab.cache_latents` writes, and `data=wds_latents`, the DataModule reading them.

A sample is `{key}.mean.npy` + `{key}.std.npy` (the VAE posterior's mean and std, (C, h, w) float16) or
`{key}.latent.npy` (one posterior sample, float16), plus the source's `.cls` / `.txt` / `.json`. Batches carry
RAW latents: the LDM module multiplies by its latent scale factor itself (EDM2: raw latents offline, scaled
just in time), so one cache serves any scale factor.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np
import torch

from ldmlab.data.decoders import Fields, where
from ldmlab.data.filters import BadSample
from ldmlab.data.shards import MANIFEST, Urls, read_manifest, sibling_url
from ldmlab.data.transforms import batch_buffer
from ldmlab.data.wds import ShardDataModule

LATENT_FIELDS = ("mean.npy", "std.npy", "latent.npy")


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` serialised as .npy (self-describing: dtype and shape travel with the bytes)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    """An array from .npy bytes (pickles refused: loading never executes code from a file)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class LatentDecoder:
    """Raw latent sample → (mean, std or None, label, text, key); collate draws mean + std·ε (seeded)."""

    def __init__(self, fields: Fields | None = None, sample_posterior: bool = True,
                 shape: Sequence[int] | None = None) -> None:
        self.fields, self.sample_posterior = fields or Fields(), sample_posterior
        self.shape = tuple(shape) if shape is not None else None

    def __call__(self, sample: dict, rng: random.Random | None) -> tuple:
        mean, std = self._arrays(sample)
        if self.shape is None:
            self.shape = mean.shape  # no manifest shape: the first sample of this worker sets it
        if mean.shape != self.shape or (std is not None and std.shape != mean.shape):
            raise BadSample("shape", f"{where(sample)}: latent shape {mean.shape} (std "
                                     f"{None if std is None else std.shape}) differs from {self.shape}")
        label, text = self.fields(sample)
        return mean, std, label, text, sample["__key__"]

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
        means, stds, labels, texts, keys = zip(*items)
        latent = batch_buffer((len(means), *means[0].shape), torch.float32)
        np.stack(means, out=latent.numpy(), casting="same_kind")  # float16 → float32
        if self.sample_posterior and any(s is not None for s in stds):
            std = torch.from_numpy(np.stack([np.zeros_like(m) if s is None else s
                                             for m, s in zip(means, stds)]))
            eps = torch.randn(latent.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
            latent.addcmul_(std.float(), eps)  # mean + std·ε, in place in the (shared) batch buffer
        return {"latent": latent, "label": torch.tensor(labels, dtype=torch.int64), "text": list(texts),
                "key": list(keys)}


class LatentDataModule(ShardDataModule):
    """Raw-latent batches {"latent", "label", "text", "key"} from cache_latents shards; the VAE never runs."""

    def __init__(
        self,
        train_urls: Urls | None = None,
        val_urls: Urls | None = None,
        root: str | None = None,
        weights: Sequence[float] | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        sample_posterior: bool = True,
        seed: int = 0,
        label_key: str | None = "cls",
        text_key: str | None = "txt",
        required: Sequence[str] = (),
        max_bad_fraction: float = 0.01,
        bad_check_after: int = 200,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(train_urls, val_urls, root=root, weights=weights, batch_size=batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         samples_per_epoch=samples_per_epoch, seed=seed, max_bad_fraction=max_bad_fraction,
                         bad_check_after=bad_check_after, pin_memory=pin_memory)
        self.sample_posterior = sample_posterior
        self.fields = Fields(label_key, text_key, list(required))

    def make_decoder(self, train: bool) -> LatentDecoder:
        """Latent decoder; validation draws ε from a fixed seed, so its latents are the same every epoch."""
        return LatentDecoder(self.fields, self.sample_posterior, self.latent_shape)

    @property
    def latent_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) from the cache's manifest.json, or None when there is none."""
        first = self.train_sources()[0][0]
        shape = read_manifest(sibling_url(first, MANIFEST)).get("latent_shape")
        return tuple(shape) if shape else None
