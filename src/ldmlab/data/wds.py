"""LightningDataModules over WebDataset shards: images (`data=wds`, `data=demo`); latents in `latents.py`.

The stream itself (equal batches on every rank, exact and resampled epochs, bad-sample handling) is
`ldmlab.data.pipeline`; url expansion and sample counts are `ldmlab.data.shards`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldmlab.data.decoders import Decoder, Fields, ImageDecoder
from ldmlab.data.demo import DemoSpec, as_scale, build_demo_shards, class_names
from ldmlab.data.filters import SampleCounter, check_fraction
from ldmlab.data.pipeline import EpochLoader, ShardStream
from ldmlab.data.shards import (
    MANIFEST,
    Urls,
    count_samples,
    expand_urls,
    is_local,
    manifest_urls,
    read_manifest,
    shard_counts,
    slot_shards,
)
from ldmlab.data.transforms import ImageTransform, normalize

__all__ = ["DemoDataModule", "EpochLoader", "ShardDataModule", "ShardStream", "WebDatasetDataModule",
           "count_samples", "expand_urls", "slot_shards"]


def _rank_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(global rank, world size) from the trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(pl.LightningDataModule):
    """Shard urls (or a manifest directory), weighted sources, exact/resampled epochs, validation, loaders.

    Subclasses say how a raw sample becomes a batch item (`make_decoder`).
    """

    def __init__(self, train_urls: Urls | None = None, val_urls: Urls | None = None, *, root: str | None = None,
                 weights: Sequence[float] | None = None, batch_size: int = 64, num_workers: int = 2,
                 shuffle_buffer: int = 1000, samples_per_epoch: int | None = None, seed: int = 0,
                 max_bad_fraction: float = 0.01, bad_check_after: int = 200, pin_memory: bool = False) -> None:
        super().__init__()
        self.train_urls, self.val_urls, self.root = train_urls, val_urls, root
        self.weights = [float(w) for w in weights] if weights is not None else None
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.shuffle_buffer, self.samples_per_epoch, self.seed = shuffle_buffer, samples_per_epoch, seed
        self.max_bad_fraction, self.bad_check_after = max_bad_fraction, bad_check_after
        check_fraction(max_bad_fraction)  # fail at construction, not in a worker
        self.train_set: ShardStream | None = None
        self.val_set: ShardStream | None = None

    def make_decoder(self, train: bool) -> Decoder:
        """Raw sample → batch item, for training (augmented) or validation (deterministic)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ urls

    def train_sources(self) -> list[list[str]]:
        """Expanded training urls, one list per source (one source unless data.weights is set)."""
        if self.train_urls is None:
            if self.root is None:
                raise ValueError("no training data: set data.train_urls (shard urls) or data.root (a directory "
                                 "written by make_shards or cache_latents)")
            return [self._root_split("train")]
        if self.weights is None:
            return [expand_urls(self.train_urls)]
        sources = [self.train_urls] if isinstance(self.train_urls, str) else list(self.train_urls)
        if len(sources) != len(self.weights):
            raise ValueError(f"data.weights has {len(self.weights)} entries but data.train_urls has "
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
            raise FileNotFoundError(f"{self.root}/{MANIFEST} lists no '{split}-*' shards: check data.root")
        return urls

    # ------------------------------------------------------------------ streams

    def setup(self, stage: str | None = None) -> None:
        """Expand urls, count samples and fix the per-rank batch counts (after DDP is up, on every rank)."""
        rank, world_size = _rank_world(self.trainer)
        if stage in (None, "fit"):
            self.train_set = self.make_train_set(rank, world_size)
        if stage in (None, "fit", "validate") and self.val_url_list() is not None:
            self.val_set = self.make_val_set(rank, world_size)

    def make_train_set(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The training stream of one rank (tests call this directly to simulate ranks)."""
        sources = self.train_sources()
        resampled = self.samples_per_epoch is not None
        if self.weights is not None and not resampled:
            raise ValueError("data.weights mix sources by sampling: set data.samples_per_epoch (resampled "
                             "epochs); exact epochs read every source once, so weights have no meaning there")
        counts = None if resampled else [shard_counts(s) for s in sources]
        samples = self.samples_per_epoch or sum(map(sum, counts))
        per_rank = samples // (world_size * self.batch_size)  # drop_last: only whole batches
        if per_rank == 0:
            raise ValueError(f"{samples} training samples make no batch of {self.batch_size} on each of "
                             f"{world_size} ranks; lower batch_size or set samples_per_epoch")
        return ShardStream(sources, decoder=self.make_decoder(train=True), batch_size=self.batch_size,
                           batches_per_rank=per_rank, mode="resampled" if resampled else "exact", counts=counts,
                           weights=self.weights, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                           rank=rank, world_size=world_size, counter=self._counter())

    def make_val_set(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The validation stream of one rank: deterministic decoding, fixed order."""
        urls = self.val_url_list()
        if urls is None:
            raise ValueError("no validation shards: set data.val_urls")
        counts = shard_counts(urls, "validation sets")
        if sum(counts) == 0:
            raise ValueError(f"validation shards {self.val_urls or self.root!r} hold no samples")
        per_rank = math.ceil(math.ceil(sum(counts) / world_size) / self.batch_size)
        return ShardStream([urls], decoder=self.make_decoder(train=False), batch_size=self.batch_size,
                           batches_per_rank=per_rank, mode="eval", counts=[counts], seed=self.seed,
                           rank=rank, world_size=world_size, counter=self._counter())

    def _counter(self) -> SampleCounter:
        return SampleCounter(self.max_bad_fraction, self.bad_check_after)

    # ------------------------------------------------------------------ loaders

    def train_dataloader(self) -> EpochLoader:
        """Training batches; the trainer's epoch reseeds shard order, shuffling and augmentation."""
        return self._loader(self.train_set, lambda: self.trainer.current_epoch if self.trainer else None)

    def val_dataloader(self) -> EpochLoader | list:
        """Validation batches, or [] (no validation) when there are no validation shards."""
        return self._loader(self.val_set, None) if self.val_set is not None else []

    def _loader(self, dataset: ShardStream | None, epoch_fn: Callable[[], int | None] | None) -> EpochLoader:
        """A DataLoader over pre-batched items (batch_size=None: batching happens in the workers)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # ShardStream's __len__ is exact per rank (pipeline docstring), which Lightning's warning can't know.
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        return EpochLoader(dataset, epoch_fn, num_workers=self.num_workers, pin_memory=self.pin_memory)

    @property
    def class_names(self) -> list[str] | None:
        """Class names from classes.json in data.root or next to the training shards, or None."""
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


class WebDatasetDataModule(ShardDataModule):
    """Image batches {"image", "label", "text", "key"} from WebDataset shards, as many on every DDP rank."""

    def __init__(
        self,
        train_urls: Urls | None = None,
        val_urls: Urls | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 256,
        random_crop: bool = False,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        pin_memory: bool = False,
        root: str | None = None,
        weights: Sequence[float] | None = None,
        label_key: str | None = "cls",
        text_key: str | None = "txt",
        required: Sequence[str] = (),
        min_image_size: int = 1,
        max_bad_fraction: float = 0.01,
        bad_check_after: int = 200,
    ) -> None:
        super().__init__(train_urls, val_urls, root=root, weights=weights, batch_size=batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         samples_per_epoch=samples_per_epoch, seed=seed, max_bad_fraction=max_bad_fraction,
                         bad_check_after=bad_check_after, pin_memory=pin_memory)
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.fields = Fields(label_key, text_key, list(required))
        self.min_image_size = min_image_size

    def setup(self, stage: str | None = None) -> None:
        """As ShardDataModule.setup; under a Trainer, images travel as uint8 (see on_after_batch_transfer)."""
        self.uint8_transfer = self.trainer is not None
        super().setup(stage)

    def make_decoder(self, train: bool) -> ImageDecoder:
        """Decode + resize + crop (random when training and asked) + flip (training) → [-1, 1]."""
        transform = (ImageTransform(self.image_size, self.random_crop, self.random_flip) if train
                     else ImageTransform(self.image_size))
        return ImageDecoder(transform, self.fields, self.min_image_size, getattr(self, "uint8_transfer", False))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 images → float32 in [-1, 1] on the device.

        Under a Trainer the workers skip the float conversion (it costs as much as the JPEG decode on a CPU
        core) and batches cross process and host→device boundaries at a quarter of the bytes; the module
        still gets the documented float batch. Loaders used without a Trainer yield float32 directly.
        """
        if batch["image"].dtype == torch.uint8:
            batch["image"] = normalize(batch["image"])
        return batch


class DemoDataModule(WebDatasetDataModule):
    """Crops of the photographs bundled with scikit-image/-learn, one class per photo (see ldmlab.data.demo)."""

    def __init__(
        self,
        data_dir: str = "data",
        crop_size: int = 32,
        crops_per_image: int = 500,
        val_crops_per_image: int = 50,
        seed: int = 0,
        scale: Sequence[float] | None = None,
        grayscale: bool = False,
        shard_size: int = 500,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int | None = None,
        random_crop: bool = False,
        random_flip: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.spec = DemoSpec(crop_size, crops_per_image, val_crops_per_image, seed, as_scale(scale),
                             grayscale=grayscale, shard_size=shard_size)
        self.dataset_dir = Path(data_dir) / "demo" / self.spec.dirname()
        urls = {split: str(self.dataset_dir / f"{split}-{{000000..{self.spec.num_shards(split) - 1:06d}}}.tar")
                for split in ("train", "val")}
        super().__init__(urls["train"], urls["val"] if val_crops_per_image > 0 else None, batch_size=batch_size,
                         num_workers=num_workers, image_size=image_size or crop_size, random_crop=random_crop,
                         random_flip=random_flip, shuffle_buffer=shuffle_buffer,
                         samples_per_epoch=samples_per_epoch, seed=seed, pin_memory=pin_memory)

    def prepare_data(self) -> None:
        """Build the shards once (Lightning calls this on one process per node; the build is atomic)."""
        build_demo_shards(self.data_dir, spec=self.spec)

    @property
    def class_names(self) -> list[str]:
        """Source photo names in label order."""
        return class_names(self.spec.grayscale)
