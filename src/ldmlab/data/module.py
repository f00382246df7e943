"""The one LightningDataModule over WebDataset shards; what a sample becomes is its injected decoder.

    data=wds            ImageDecoder over image shards (data.train_urls / data.root)
    data=wds_latents    LatentDecoder over cache_latents shards
    data=demo, folder   the same module, with a `source` that builds the shards first (prepare_data)

The stream itself (equal batches on every rank, exact and resampled epochs, bad-sample handling, exact resume)
is `ldmlab.data.pipeline`; url expansion and sample counts are `ldmlab.data.shards`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import pytorch_lightning as pl
import torch

from ldmlab.data.buckets import probe_weights
from ldmlab.data.decoders import Decoder
from ldmlab.data.filters import SampleCounter, check_fraction
from ldmlab.data.pipeline import EpochLoader, ShardStream
from ldmlab.data.shards import (
    MANIFEST,
    DataConfigError,
    Urls,
    empty_shards,
    expand_urls,
    is_local,
    manifest_urls,
    read_manifest,
    read_segment,
    shard_counts,
    sibling_url,
)

log = logging.getLogger("ldmlab.data")


@dataclass
class StreamSettings:
    """How the shards are streamed: the flat `data.*` keys of conf/data/*.yaml besides urls, decoder, source."""

    batch_size: int = 64  # per device
    num_workers: int = 2
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # None: exact epochs (every sample once); N: resampled epochs of N
    seed: int = 0
    max_bad_fraction: float = 0.01  # stop the run when more of a rank's samples than this are bad
    bad_check_after: int = 200  # samples a rank reads before max_bad_fraction applies
    pin_memory: bool = False
    bucket_buffer: int = 16  # with data.decoder.buckets: samples pending per slot, in batches, before borrowing
    bucket_probe: int = 1000  # with data.decoder.buckets: samples whose sizes weight the bucket schedule

    def __post_init__(self) -> None:
        check_fraction(self.max_bad_fraction)  # fail at construction, not in a worker

    @classmethod
    def of(cls, settings: dict[str, Any]) -> StreamSettings:
        """Settings from `data.*` keys; a one-line error naming an unknown key."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise DataConfigError(f"data.{unknown[0]} is not a setting of the shard DataModule: valid are "
                                  f"{valid} (decoder keys go under data.decoder, e.g. data.decoder.image_size)")
        return cls(**settings)


class ShardSource(Protocol):
    """Shards built from something else (demo photographs, an image folder) into `root`, a directory with
    manifest.json; `prepare` builds them once (Lightning calls it on one process per node)."""

    @property
    def root(self) -> str: ...

    def prepare(self) -> None: ...


def _probe_samples(urls: Sequence[str], n: int, seed: int) -> Iterator[dict]:
    """About `n` raw samples from the heads of the shards in a seeded order (not one shard's one class)."""
    order = list(urls)
    random.Random(f"{seed}/probe").shuffle(order)
    per = max(16, math.ceil(n / max(1, len(order))))
    for url in order:
        yield from read_segment(url, 0, per, lambda *_: None)  # a short or broken shard: the next one


def _rank_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(global rank, world size) from the trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    """Batches of `decoder` items from shard urls, a make_shards/cache_latents directory or a `source`:
    weighted sources, exact or resampled epochs, as many batches on every DDP rank, validation, resume.

    `stream` are StreamSettings fields as keywords (conf/data keeps them flat: data.batch_size, ...).
    """

    def __init__(self, train_urls: Urls | None = None, val_urls: Urls | None = None, *, decoder: Decoder,
                 root: str | None = None, weights: Sequence[float] | None = None,
                 source: ShardSource | None = None, **stream: Any) -> None:
        super().__init__()
        if source is not None and (train_urls is not None or root is not None):
            raise DataConfigError("data.source builds its own shards: leave data.train_urls and data.root null")
        self.train_urls, self.val_urls, self._root, self.source = train_urls, val_urls, root, source
        self.weights = [float(w) for w in weights] if weights is not None else None
        self.decoder, self.stream = decoder, StreamSettings.of(stream)
        self.train_set: ShardStream | None = None
        self.val_set: ShardStream | None = None

    @property
    def root(self) -> str | None:
        """The shard directory: data.root, or where the source builds its shards."""
        return self.source.root if self.source is not None else self._root

    def prepare_data(self) -> None:
        """Build the source's shards once (one process per node; builds are atomic)."""
        if self.source is not None:
            self.source.prepare()

    # ------------------------------------------------------------------ urls

    def train_sources(self) -> list[list[str]]:
        """Expanded training urls, one list per source (one source unless data.weights is set)."""
        if self.train_urls is None:
            if self.root is None:
                raise DataConfigError("no training data: set data.train_urls (shard urls) or data.root (a "
                                      "directory written by make_shards or cache_latents)")
            return [self._root_split("train")]
        if self.weights is None:
            return [expand_urls(self.train_urls)]
        sources = [self.train_urls] if isinstance(self.train_urls, str) else list(self.train_urls)
        if len(sources) != len(self.weights):
            raise DataConfigError(f"data.weights has {len(self.weights)} entries but data.train_urls has "
                                  f"{len(sources)} sources: give one url pattern per weight")
        return [expand_urls(s) for s in sources]

    def val_url_list(self) -> list[str] | None:
        """Expanded validation urls: data.val_urls, else the root manifest's val split, else None."""
        if self.val_urls is not None:
            return expand_urls(self.val_urls)
        if self.root is not None and any(n.startswith("val-") for n in self._root_manifest().get("counts", {})):
            return self._root_split("val")
        return None

    def _root_manifest(self) -> dict:
        return read_manifest(os.path.join(self.root, MANIFEST))

    def _root_split(self, split: str) -> list[str]:
        urls = manifest_urls(self.root, split)
        if not urls:
            raise DataConfigError(f"{self.root}/{MANIFEST} lists no '{split}-*' shards: check data.root")
        return urls

    def _field(self) -> str:
        """The config field the training shards come from, for error messages."""
        return "data.train_urls" if self.train_urls is not None else "data.root"

    # ------------------------------------------------------------------ streams

    def setup(self, stage: str | None = None) -> None:
        """Expand urls, count samples and fix the per-rank batch counts (after DDP is up, on every rank).

        Under a Trainer, batches finish decoding on the device (`on_after_batch_transfer`)."""
        rank, world_size = _rank_world(self.trainer)
        on_device = self.trainer is not None
        if stage in (None, "fit"):
            self.train_set = self.make_train_set(rank, world_size, on_device)
        if stage in (None, "fit", "validate") and self.val_url_list() is not None:
            self.val_set = self.make_val_set(rank, world_size, on_device)

    def make_decoder(self, train: bool, on_device: bool = False) -> Decoder:
        """The decoder of the training (augmenting) or validation stream, with its shards' manifest."""
        urls = self.train_sources()[0] if train else self.val_url_list()
        manifest = read_manifest(sibling_url(urls[0], MANIFEST)) if urls else {}
        return self.decoder.for_stream(train, on_device, manifest)

    def make_train_set(self, rank: int = 0, world_size: int = 1, on_device: bool = False) -> ShardStream:
        """The training stream of one rank (tests call this directly to simulate ranks)."""
        s = self.stream
        sources = self.train_sources()
        resampled = s.samples_per_epoch is not None
        if self.weights is not None and not resampled:
            raise DataConfigError("data.weights mix sources by sampling: set data.samples_per_epoch (resampled "
                                  "epochs); exact epochs read every source once, so weights have no meaning there")
        counts = None if resampled else [shard_counts(u) for u in sources]
        self._check_not_empty(sources, counts)
        samples = s.samples_per_epoch or sum(map(sum, counts))
        per_rank = samples // (world_size * s.batch_size)  # drop_last: only whole batches
        if per_rank == 0:
            raise DataConfigError(f"{samples} training samples make no batch of data.batch_size={s.batch_size} on "
                                  f"each of {world_size} ranks: lower data.batch_size or set data.samples_per_epoch")
        decoder, bucket_weights = self._bucketed(self.make_decoder(True, on_device), [u for x in sources for u in x])
        return ShardStream(sources, decoder=decoder, batch_size=s.batch_size,
                           batches_per_rank=per_rank, mode="resampled" if resampled else "exact", counts=counts,
                           weights=self.weights, shuffle_buffer=s.shuffle_buffer, seed=s.seed,
                           rank=rank, world_size=world_size, counter=self._counter(),
                           bucket_weights=bucket_weights, bucket_buffer=s.bucket_buffer)

    def _check_not_empty(self, sources: list[list[str]], counts: list[list[int]] | None) -> None:
        """One line naming the training shards that hold no samples (all of them: an error; some: a warning)."""
        urls = [u for s in sources for u in s]
        empty = empty_shards(urls, [c for cs in counts for c in cs] if counts is not None else None)
        if not empty:
            return
        named = ", ".join(repr(u) for u in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        line = (f"{self._field()}: {len(empty)} of {len(urls)} training shards hold no samples ({named}: empty "
                f"or not a tar file): remove them from {self._field()}, or rewrite them with "
                f"python -m ldmlab.data.make_shards")
        if len(empty) == len(urls):
            raise DataConfigError(line)
        log.warning(line)

    def make_val_set(self, rank: int = 0, world_size: int = 1, on_device: bool = False) -> ShardStream:
        """The validation stream of one rank: deterministic decoding, fixed order."""
        urls = self.val_url_list()
        if urls is None:
            raise DataConfigError("no validation shards: set data.val_urls")
        counts = shard_counts(urls, "validation sets")
        if sum(counts) == 0:
            raise DataConfigError(f"validation shards {self.val_urls or self.root!r} hold no samples: remove "
                                  f"them from data.val_urls, or rewrite them with python -m ldmlab.data.make_shards")
        per_rank = math.ceil(math.ceil(sum(counts) / world_size) / self.stream.batch_size)
        decoder, bucket_weights = self._bucketed(self.make_decoder(False, on_device), urls)
        return ShardStream([urls], decoder=decoder, batch_size=self.stream.batch_size,
                           batches_per_rank=per_rank, mode="eval", counts=[counts], seed=self.stream.seed,
                           rank=rank, world_size=world_size, counter=self._counter(),
                           bucket_weights=bucket_weights, bucket_buffer=self.stream.bucket_buffer)

    def _bucketed(self, decoder: Decoder, urls: list[str]) -> tuple[Decoder, list[float] | None]:
        """The decoder and its bucket schedule's weights (None: no buckets). Weights are the cache manifest's
        samples per bucket, else counted over data.bucket_probe samples from the heads of the shards (the same
        on every rank); a probed decoder keeps only the buckets seen, so no sample waits for a bucket that is
        never scheduled."""
        sizes = decoder.bucket_sizes
        if sizes is None:
            return decoder, None
        weights = decoder.bucket_weights
        if weights is None:
            weights = probe_weights(_probe_samples(urls, self.stream.bucket_probe, self.stream.seed),
                                    decoder.bucket_of, len(sizes), self.stream.bucket_probe)
            if not any(weights):
                raise DataConfigError(f"no usable image among the first samples of {self._field()} fits "
                                      f"data.decoder.buckets={sizes}: check the shards and data.decoder")
            decoder = decoder.with_buckets([s for s, w in zip(sizes, weights) if w])
            weights = [w for w in weights if w]
        log.info("buckets %s, batches in proportion %s", decoder.bucket_sizes, [round(w) for w in weights])
        return decoder, weights

    def _counter(self) -> SampleCounter:
        return SampleCounter(self.stream.max_bad_fraction, self.stream.bad_check_after)

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> EpochLoader:
        """Training batches; the trainer's epoch reseeds shard order, shuffling and augmentation."""
        return self._loader(self.train_set, lambda: self.trainer.current_epoch if self.trainer else None)

    def val_dataloader(self) -> EpochLoader | list:
        """Validation batches, or [] (no validation) when there are no validation shards."""
        return self._loader(self.val_set, None) if self.val_set is not None else []

    def full_val_dataloader(self) -> EpochLoader:
        """Every validation batch, on every rank (not this rank's share): for an evaluation that splits its work
        over ranks itself, so that image i is the same whatever the number of ranks."""
        return self._loader(self.make_val_set(), None)

    def _loader(self, dataset: ShardStream | None, epoch_fn: Callable[[], int | None] | None) -> EpochLoader:
        """A DataLoader over pre-batched items (batch_size=None: batching happens in the workers)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # ShardStream's __len__ is exact per rank (pipeline docstring), which Lightning's warning can't know.
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        return EpochLoader(dataset, epoch_fn, num_workers=self.stream.num_workers, pin_memory=self.stream.pin_memory)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """The decoder's last step, on the device (images: uint8 → float32 in [-1, 1]; see ImageDecoder)."""
        return self.decoder.on_device(batch)

    # ------------------------------------------------------------------ what the data is

    @property
    def class_names(self) -> list[str] | None:
        """Class names from classes.json in the shard directory or next to the training shards, or None."""
        if self.root is not None:
            path = Path(self.root) / "classes.json"
        else:
            first = self.train_sources()[0][0]
            path = Path(first).parent / "classes.json" if is_local(first) else None
        return json.loads(path.read_text()) if path is not None and path.is_file() else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes (labels are 0..num_classes-1), or None when unknown."""
        names = self.class_names
        return len(names) if names is not None else None
