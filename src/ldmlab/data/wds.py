"""WebDataset pipelines and DataModules that give every DDP rank the same number of batches.

Uneven shards hang DDP: a rank that runs out early stops calling all-reduce while the others wait. So the
number of batches is fixed up front and every (rank, worker) produces exactly its share:

* `batches_per_rank` = samples // (world_size · batch_size), where samples is the epoch's sample count
  (manifest/tar scan, or `samples_per_epoch` in resampled mode); the rank's batches are split over its
  DataLoader workers as evenly as possible (`worker_share`), so every rank yields exactly that many.
* train, exact epoch (`samples_per_epoch=None`): the shard list is shuffled with a seed that all ranks share
  (seed, epoch), then split by node and by worker (`slot_shards`; a slot past the last shard reuses one).
  Each worker cycles through its shards (reshuffled each pass) and stops after its share: "repeat + slice".
  With uneven shards some samples repeat and some are skipped in an epoch; the count is what is exact.
* train, resampled (`samples_per_epoch=N`): each worker draws shards with replacement from its own seeded
  stream, forever, and stops after its share (what webdataset's `resampled=True` + `with_epoch` do).
* validation: every worker reads all val shards in order (val sets are small), keeps the samples of its rank
  (sample i goes to rank i % world_size) and the batches of its worker (batch b to worker b % workers), and
  decodes only those. ceil(samples / world_size) samples per rank, padded by wrapping around to whole
  batches: deterministic, every sample seen at least once, same batch count and shape on every rank.
"""

from __future__ import annotations

import glob
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cache
from itertools import count, islice
from pathlib import Path

import braceexpand
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldmlab.data.demo import DemoSpec, as_scale, build_demo_shards, class_names
from ldmlab.data.transforms import ImageTransform

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

Urls = str | Sequence[str]


def _is_local(url: str) -> bool:
    """Whether `url` is a file path (as opposed to pipe:, http:, s3:, ... which webdataset also opens)."""
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(urls: Urls) -> list[str]:
    """Brace-expand (and glob local) shard urls; raise a one-line error when local shards don't exist."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if _is_local(url) and any(c in url for c in "*?["):
                out += sorted(glob.glob(os.path.expanduser(url)))
            else:
                out.append(os.path.expanduser(url) if _is_local(url) else url)
    missing = [u for u in out if _is_local(u) and not os.path.isfile(u)]
    if not out or len(missing) == len(out):
        raise FileNotFoundError(f"no shards match {urls!r}: check the directory, and write shard ranges as "
                                f"brace expansions, e.g. 'dir/train-{{000000..000003}}.tar'")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shards in {urls!r} do not exist, "
                                f"first {missing[0]!r}: fix the brace range")
    return out


@cache
def _manifest_counts(directory: str) -> dict[str, int]:
    """{shard file name: samples} from `<directory>/manifest.json` ("counts"), or {} if there is none."""
    path = Path(directory) / "manifest.json"
    return json.loads(path.read_text()).get("counts", {}) if path.is_file() else {}


@cache
def _scan_count(path: str) -> int:
    """Number of samples (distinct keys) in a tar shard, from its headers."""
    with tarfile.open(path) as tar:
        return len({m.name.split("/")[-1].split(".")[0] + "/" + os.path.dirname(m.name)
                    for m in tar if m.isreg()})


def count_samples(urls: Sequence[str]) -> int:
    """Total samples in local shards: manifest.json counts where present, else a scan of the tar headers."""
    remote = [u for u in urls if not _is_local(u)]
    if remote:
        raise ValueError(f"cannot count samples in remote shard {remote[0]!r}; set samples_per_epoch")
    return sum(_manifest_counts(os.path.dirname(os.path.abspath(u))).get(os.path.basename(u)) or _scan_count(u)
               for u in urls)


def worker_share(n: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` of `num_workers` makes out of a rank's `n`: they differ by at most one."""
    return n // num_workers + (worker < n % num_workers)


def slot_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """split_by_node then split_by_worker (as webdataset's), but a slot past the last shard reuses one."""
    own = list(urls)[rank::world_size][worker::num_workers]
    return own or [urls[(rank + world_size * worker) % len(urls)]]


def decode_sample(sample: dict) -> tuple[Image.Image, int, str]:
    """wds sample → (RGB PIL image, label or -1 when there is no .cls, key)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise KeyError(f"sample {sample['__key__']!r} in shard {sample.get('__url__')!r} has no image "
                       f"(expected one of .{'/.'.join(IMAGE_EXTS)}, found {found})")
    image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, label, sample["__key__"]


def collate(items: list[tuple[torch.Tensor, int, str]]) -> dict:
    """[(image, label, key)] → {"image": (B,3,H,W) float32, "label": (B,) int64, "key": [str]}."""
    images, labels, keys = zip(*items)
    return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last partial one is dropped; the streams here are infinite)."""
    while len(chunk := list(islice(it, size))) == size:
        yield chunk


class ShardStream(IterableDataset):
    """Batches from tar shards for one rank; every worker yields exactly its share of `batches_per_rank`."""

    def __init__(self, urls: Sequence[str], *, batch_size: int, batches_per_rank: int, mode: str,
                 transform: ImageTransform, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_samples: int | None = None) -> None:
        if mode not in ("exact", "resampled", "eval"):
            raise ValueError(f"mode must be exact, resampled or eval, got {mode!r}")
        if mode == "eval" and num_samples is None:
            raise ValueError("eval mode needs num_samples")
        self.urls, self.batch_size, self.batches_per_rank = list(urls), batch_size, batches_per_rank
        self.mode, self.transform, self.shuffle_buffer, self.seed = mode, transform, shuffle_buffer, seed
        self.rank, self.world_size, self.num_samples = rank, world_size, num_samples
        # Shared memory, so persistent workers see the epoch EpochLoader sets; it reseeds order and augmentation.
        self._epoch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        """Epoch number that seeds shard order, shuffling and augmentation."""
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        quota = worker_share(self.batches_per_rank, worker, num_workers)
        if self.mode == "eval":
            return islice(self._eval_batches(worker, num_workers), quota)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")  # str seeds are stable
        return islice(self._train_batches(worker, num_workers, rng), quota)

    def _train_samples(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        """Endless shuffled samples for this (rank, worker)."""
        if self.mode == "resampled":
            yield from self._shuffled((rng.choice(self.urls) for _ in count()), rng)
        for pass_ in count():
            order = list(self.urls)
            # Seeded identically on all ranks, so the slots of one pass partition the shards.
            random.Random(f"{self.seed}/{self.epoch}/{pass_}").shuffle(order)
            # Shuffled per pass: a buffer over the endless stream would mix in repeats before a pass is done.
            yield from self._shuffled(slot_shards(order, self.rank, self.world_size, worker, num_workers), rng)

    def _shuffled(self, urls: Iterable[str], rng: random.Random) -> Iterator[dict]:
        """Samples of `urls` through the shuffle buffer."""
        samples = wds.tarfile_samples({"url": u} for u in urls)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return iter(samples)

    def _train_batches(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        """Shards → samples → shuffle buffer → decode + transform → batches."""
        for chunk in _chunks(self._train_samples(worker, num_workers, rng), self.batch_size):
            yield collate([self._load(s, rng) for s in chunk])

    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """This rank's samples in shard order, wrapped around forever; this worker's batches, decoded."""
        # Sample i belongs to rank i % world_size; a rank past the last sample (tiny val sets) borrows one.
        n = self.num_samples or 1
        own = self.rank if n >= self.world_size else self.rank % n

        def passes() -> Iterator[dict]:
            while True:
                for i, s in enumerate(wds.tarfile_samples({"url": u} for u in self.urls)):
                    if i % self.world_size == own:
                        yield s

        for b, chunk in enumerate(_chunks(passes(), self.batch_size)):
            if b % num_workers == worker:
                yield collate([self._load(s, None) for s in chunk])

    def _load(self, sample: dict, rng: random.Random | None) -> tuple[torch.Tensor, int, str]:
        """Decode and transform one sample."""
        image, label, key = decode_sample(sample)
        return self.transform(image, rng), label, key


class EpochLoader(DataLoader):
    """DataLoader over pre-batched items that sets its ShardStream's epoch before each pass.

    Workers are persistent: besides saving start-up time, forking once per loader instead of once per epoch
    avoids CPython gh-112275 (3.11.7 here): a worker forked while another thread exits can deadlock.
    """

    def __init__(self, dataset: ShardStream, epoch_fn: Callable[[], int | None] | None = None, **kw) -> None:
        kw.setdefault("persistent_workers", kw.get("num_workers", 0) > 0)
        super().__init__(dataset, batch_size=None, **kw)
        self._epoch_fn, self._iters = epoch_fn, 0

    def __iter__(self):
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        self.dataset.epoch = self._iters if epoch is None else epoch
        self._iters += 1
        return super().__iter__()


def _rank_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(global rank, world size) from the trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetDataModule(pl.LightningDataModule):
    """Image batches {"image", "label", "key"} from WebDataset shards, equally many on every DDP rank."""

    def __init__(
        self,
        train_urls: Urls,
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
    ) -> None:
        super().__init__()
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.shuffle_buffer, self.samples_per_epoch, self.seed = shuffle_buffer, samples_per_epoch, seed
        self.train_set: ShardStream | None = None
        self.val_set: ShardStream | None = None

    def setup(self, stage: str | None = None) -> None:
        """Expand urls, count samples and fix the per-rank batch counts (after DDP is up, on every rank)."""
        rank, world_size = _rank_world(self.trainer)
        if stage in (None, "fit"):
            self.train_set = self.make_train_set(rank, world_size)
        if self.val_urls is not None and stage in (None, "fit", "validate"):
            self.val_set = self.make_val_set(rank, world_size)

    def make_train_set(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The training stream of one rank (tests call this directly to simulate ranks)."""
        urls = expand_urls(self.train_urls)
        samples = self.samples_per_epoch or count_samples(urls)
        per_rank = samples // (world_size * self.batch_size)  # drop_last: only whole batches
        if per_rank == 0:
            raise ValueError(f"{samples} training samples make no batch of {self.batch_size} on each of "
                             f"{world_size} ranks; lower batch_size or set samples_per_epoch")
        return ShardStream(urls, batch_size=self.batch_size, batches_per_rank=per_rank,
                           mode="resampled" if self.samples_per_epoch else "exact",
                           transform=ImageTransform(self.image_size, self.random_crop, self.random_flip),
                           shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world_size)

    def make_val_set(self, rank: int = 0, world_size: int = 1) -> ShardStream:
        """The validation stream of one rank: centre crops, no flips, fixed order."""
        if self.val_urls is None:
            raise ValueError("no val_urls given")
        urls = expand_urls(self.val_urls)
        samples = count_samples(urls)
        if samples == 0:
            raise ValueError(f"validation shards {self.val_urls!r} hold no samples")
        per_rank = math.ceil(math.ceil(samples / world_size) / self.batch_size)
        return ShardStream(urls, batch_size=self.batch_size, batches_per_rank=per_rank, mode="eval",
                           transform=ImageTransform(self.image_size), seed=self.seed,
                           rank=rank, world_size=world_size, num_samples=samples)

    def train_dataloader(self) -> EpochLoader:
        """Training batches; the trainer's epoch reseeds shard order, shuffling and augmentation."""
        return self._loader(self.train_set, lambda: self.trainer.current_epoch if self.trainer else None)

    def val_dataloader(self) -> EpochLoader | list:
        """Validation batches, or [] (no validation) when val_urls is None."""
        return self._loader(self.val_set, None) if self.val_urls is not None else []

    def _loader(self, dataset: ShardStream | None, epoch_fn: Callable[[], int | None] | None) -> EpochLoader:
        """A DataLoader over pre-batched items (batch_size=None: batching happens in the workers)."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # ShardStream's __len__ is exact per rank (module docstring), which Lightning's warning can't know.
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        return EpochLoader(dataset, epoch_fn, num_workers=self.num_workers, pin_memory=self.pin_memory)

    @property
    def class_names(self) -> list[str] | None:
        """Class names from classes.json next to the training shards, or None when there is none."""
        first = expand_urls(self.train_urls)[0]
        path = Path(first).parent / "classes.json"
        return json.loads(path.read_text()) if _is_local(first) and path.is_file() else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes (labels are 0..num_classes-1), or None when unknown."""
        names = self.class_names
        return len(names) if names is not None else None


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
        super().__init__(urls["train"], urls["val"] if val_crops_per_image > 0 else None, batch_size,
                         num_workers, image_size or crop_size, random_crop, random_flip, shuffle_buffer,
                         samples_per_epoch, seed, pin_memory)

    def prepare_data(self) -> None:
        """Build the shards once (Lightning calls this on one process per node; the build is atomic)."""
        build_demo_shards(self.data_dir, spec=self.spec)

    @property
    def class_names(self) -> list[str]:
        """Source photo names in label order."""
        return class_names(self.spec.grayscale)
