"""The sample stream of one rank: shards → split over ranks and workers → shuffle → decode → batches.

Uneven shards hang DDP: a rank that runs out early stops calling all-reduce while the others wait. So the
number of batches is fixed up front (`batches_per_rank`) and every (rank, worker) slot yields exactly its
share (`worker_share`), whatever the shards hold. Modes:

* exact: the epoch is the concatenation of all shards in an order shuffled by (seed, epoch) — the same on
  every rank — cut into contiguous position ranges, one per slot: rank r, worker k gets the positions of its
  batches, reading only the shard pieces that hold them (`segments`). Every sample is seen exactly once per
  epoch except the < world_size·batch_size tail that doesn't fill a batch on every rank (a different tail each
  epoch). Needs per-shard counts (manifest.json or local tar headers).
* resampled: each source's shard list is shuffled by (seed, epoch) and split by node and worker (a slot past
  the last shard reuses one); each slot then draws shards with replacement from its own seeded rng forever,
  mixes the sources sample by sample with their weights, and stops after its share (webdataset's
  `resampled=True` + `with_epoch`, but per rank, with mixing).
* eval: fixed order, no shuffle; rank r owns positions [r·n, (r+1)·n) with n = ceil(samples / world_size),
  padded by wrapping around its own range to whole batches: deterministic, ranks disjoint, every sample seen.

Bad samples are skipped and counted (`ldmlab.data.filters`); a slot that lost samples refills from its own
range (exact, eval) so the batch count never changes.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldmlab.data.decoders import Decoder
from ldmlab.data.filters import BadSample, BadSamplesError, SampleCounter
from ldmlab.data.shards import Segment, read_segment, segments, slot_shards, worker_share, wrapped

log = logging.getLogger("ldmlab.data")
MODES = ("exact", "resampled", "eval")


class ShardStream(IterableDataset):
    """Batches from tar shards for one rank; every worker yields exactly its share of `batches_per_rank`."""

    def __init__(self, sources: Sequence[Sequence[str]], *, decoder: Decoder, batch_size: int,
                 batches_per_rank: int, mode: str, counts: Sequence[Sequence[int]] | None = None,
                 weights: Sequence[float] | None = None, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, counter: SampleCounter | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "resampled" and counts is None:
            raise ValueError(f"{mode} mode needs per-shard counts")
        self.sources = [list(s) for s in sources]
        self.counts = [list(c) for c in counts] if counts is not None else None
        self.weights = list(weights) if weights is not None else [1.0] * len(self.sources)
        if len(self.weights) != len(self.sources) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights {self.weights} must be one non-negative number per source, not all 0")
        self.decoder, self.batch_size, self.batches_per_rank = decoder, batch_size, batches_per_rank
        self.mode, self.shuffle_buffer, self.seed = mode, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.counter = counter or SampleCounter()
        # Shared memory, so persistent workers see the epoch EpochLoader sets (it reseeds order, augmentation).
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
        tag = "eval" if self.mode == "eval" else self.epoch
        rng = random.Random(f"{self.seed}/{tag}/{self.rank}/{worker}")  # str seeds are stable across runs
        if self.mode == "resampled":
            samples = self._shuffled(self._resampled(worker, num_workers, rng), rng)
        else:
            samples = self._cycle(self._slot_segments(worker, num_workers), rng)
        return islice(self._batches(samples, rng), quota)

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """`samples` through the shuffle buffer (not in eval mode)."""
        if self.mode == "eval" or self.shuffle_buffer <= 1:
            return samples
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    # ------------------------------------------------------------------ which samples a slot reads

    def _slot_segments(self, worker: int, num_workers: int) -> list[Segment]:
        """Shard pieces of this (rank, worker) slot in exact and eval mode."""
        urls = [u for s in self.sources for u in s]
        counts = [c for s in self.counts for c in s]
        first = sum(worker_share(self.batches_per_rank, j, num_workers) for j in range(worker))
        start = first * self.batch_size
        stop = start + worker_share(self.batches_per_rank, worker, num_workers) * self.batch_size
        if self.mode == "exact":
            order = list(range(len(urls)))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # same on every rank: slots partition it
            offset = self.rank * self.batches_per_rank * self.batch_size
            return segments([urls[i] for i in order], [counts[i] for i in order], offset + start, offset + stop)
        total = sum(counts)
        per_rank = math.ceil(total / self.world_size)
        lo, hi = self.rank * per_rank, min((self.rank + 1) * per_rank, total)
        if lo >= hi:  # more ranks than val samples: borrow one so every rank has batches
            lo = self.rank % total
            hi = lo + 1
        return [seg for a, b in wrapped(lo, hi, start, stop) for seg in segments(urls, counts, a, b)]

    def _cycle(self, segs: list[Segment], rng: random.Random) -> Iterator[dict]:
        """The samples of `segs`, then again (refills what bad samples took) until the quota is met.

        Shuffled pass by pass: a buffer over the endless stream would mix in repeats before a pass is done.
        """
        while segs:
            n = 0
            for sample in self._shuffled(self._read(segs), rng):
                n += 1
                yield sample
            if n == 0:
                raise BadSamplesError(f"shards {sorted({u for u, _, _ in segs})[:3]} yielded no samples: "
                                      f"check they are readable tar files; {self.counter.describe()}")

    def _read(self, segs: list[Segment]) -> Iterator[dict]:
        """One pass over the samples of `segs`."""
        for url, start, stop in segs:
            yield from read_segment(url, start, stop, self._shard_error)

    def _resampled(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[dict]:
        """Endless samples of this slot: each source resampled from its pool, mixed by weight."""
        streams = []
        for i, urls in enumerate(self.sources):
            order = list(urls)
            random.Random(f"{self.seed}/{self.epoch}/{i}").shuffle(order)
            pool = slot_shards(order, self.rank, self.world_size, worker, num_workers)
            streams.append(self._endless(pool, rng))
        return streams[0] if len(streams) == 1 else self._mix(streams, rng)

    def _mix(self, streams: list[Iterator[dict]], rng: random.Random) -> Iterator[dict]:
        """Sample by sample, from a source drawn with probability proportional to its weight."""
        while True:
            yield next(streams[rng.choices(range(len(streams)), self.weights)[0]])

    def _endless(self, pool: list[str], rng: random.Random) -> Iterator[dict]:
        """Samples of shards drawn with replacement from `pool`, forever."""
        empty = 0
        while True:
            n = 0
            for sample in read_segment(rng.choice(pool), 0, None, self._shard_error):
                n += 1
                yield sample
            empty = 0 if n else empty + 1
            if empty > max(10, 2 * len(pool)):
                raise BadSamplesError(f"{empty} shards in a row from {pool[:3]} yielded no samples: check "
                                      f"they are readable tar files; {self.counter.describe()}")

    # ------------------------------------------------------------------ decoding and batching

    def _batches(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        """Decode samples (skipping and counting bad ones) and collate them into batches."""
        items, good = [], 0  # good: decoded since the counter last heard (shared counts cost a lock each)
        for sample in samples:
            try:
                items.append(self.decoder(sample, rng))
            except BadSample as error:
                bad = error
            else:
                bad = None
            if bad is not None:  # counted outside the except: a hard stop's traceback shows one error, not two
                self.counter.good(good)
                self.counter.bad(bad)
                good = 0
                continue
            good += 1
            if len(items) == self.batch_size:
                self.counter.good(good)
                yield self.decoder.collate(items, rng)
                items, good = [], 0

    def _shard_error(self, url: str, error: Exception, missing: int | None) -> None:
        """A shard that failed part-way (truncated tar, failed pipe command): count what it lost."""
        message = f"shard {url!r} ended early ({type(error).__name__}: {error})"
        self.counter.bad(BadSample("shard", message), n=missing or 1)


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
        if self._iters and self.dataset.counter.summary()["bad"]:
            log.warning("data (rank %d, %s): %s so far", self.dataset.rank, self.dataset.mode,
                        self.dataset.counter.describe())
        self.dataset.epoch = self._iters if epoch is None else epoch
        self._iters += 1
        return self._stop_workers_on_error(super().__iter__())

    def _stop_workers_on_error(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Yield from `batches`; on an error (e.g. BadSamplesError) stop the workers before re-raising.

        The re-raised worker error's traceback holds the iterator in a reference cycle, so torch's own
        shutdown would run in the garbage collector with its queues half torn down: 5 s per worker.
        """
        try:
            yield from batches
        except GeneratorExit:  # the consumer stopped early (limit_*_batches): workers stay for the next epoch
            raise
        except BaseException:
            if hasattr(batches, "_shutdown_workers"):
                batches._shutdown_workers()
                self._iterator = None  # persistent workers are gone: the next epoch starts new ones
            raise
