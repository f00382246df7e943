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

Aspect-ratio buckets (a decoder with `bucket_sizes`; `ldmlab.data.buckets`): step j of a pass uses the bucket a
seeded schedule of (seed, epoch) gives it, the same on every rank; each slot fills its steps' buckets from its
own samples through a bounded buffer, grouping by header alone, so the resume below replays the grouping.

Bad samples are skipped and counted (`ldmlab.data.filters`); a slot that lost samples refills from its own
range (exact, eval) so the batch count never changes.

Resume: everything random in a pass is a function of (seed, epoch, rank, slot): shard order, shuffling and
resampling draw from one rng per slot, augmentation from one rng per batch. So the stream from any position is
reproducible: `EpochLoader.state_dict()` is the epoch, the batches of this rank already yielded, and how many
raw samples each slot had read by then; a resumed slot reads (without decoding) that many samples and goes on.
The read count travels from the worker beside its batch (`Positioned`), never inside the batch dict; the
EpochLoader keeps it (`position`) and Lightning's fit loop checkpoints it through the loader's `state_dict`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import NamedTuple

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldmlab.data.buckets import BucketBatcher, bucket_schedule
from ldmlab.data.decoders import Decoder
from ldmlab.data.filters import BadSample, BadSamplesError, SampleCounter
from ldmlab.data.shards import Segment, read_segment, segments, slot_shards, worker_share, wrapped
from ldmlab.utils.distributed import gather_per_rank

log = logging.getLogger("ldmlab.data")
MODES = ("exact", "resampled", "eval")
MAX_WORKERS = 256  # slots of the shared resume plan


class Positioned(NamedTuple):
    """A batch and the raw samples its slot had read when it was made: what a ShardStream yields."""

    batch: dict
    read: int


class StreamPosition(NamedTuple):
    """Where a rank's pass stands: its epoch, the batches handed out, raw samples read per worker slot."""

    epoch: int
    batches: int
    read: list[int]


class ShardStream(IterableDataset):
    """Positioned batches from tar shards for one rank; every worker yields exactly its share of
    `batches_per_rank` (iterate it through an EpochLoader for plain batches)."""

    def __init__(self, sources: Sequence[Sequence[str]], *, decoder: Decoder, batch_size: int,
                 batches_per_rank: int, mode: str, counts: Sequence[Sequence[int]] | None = None,
                 weights: Sequence[float] | None = None, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, counter: SampleCounter | None = None,
                 bucket_weights: Sequence[float] | None = None, bucket_buffer: int = 16) -> None:
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
        # Aspect-ratio buckets (the decoder's bucket_sizes): the schedule's weights, the buffer in batches.
        self.bucket_weights = list(bucket_weights) if bucket_weights is not None else None
        if self.bucket_weights is not None and len(self.bucket_weights) != len(decoder.bucket_sizes or ()):
            raise ValueError(f"{len(self.bucket_weights)} bucket weights for buckets {decoder.bucket_sizes}")
        self.bucket_buffer = bucket_buffer
        # Shared memory, so persistent workers see what EpochLoader sets before each pass:
        # [epoch (reseeds order, augmentation), batches to skip, raw samples read per slot...].
        self._pass = multiprocessing.RawArray("q", 2 + MAX_WORKERS)

    @property
    def epoch(self) -> int:
        """Epoch number that seeds shard order, shuffling and augmentation."""
        return self._pass[0]

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._pass[0] = value

    def start_pass(self, epoch: int, skip: int = 0, read: Sequence[int] = ()) -> None:
        """Set the next pass: `epoch`, from its batch `skip` on, slot k having read `read[k]` raw samples."""
        if len(read) > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} DataLoader workers, got {len(read)}")
        self._pass[:2] = [epoch, skip]
        self._pass[2:2 + MAX_WORKERS] = [*read, *[0] * (MAX_WORKERS - len(read))]

    def __len__(self) -> int:
        return self.batches_per_rank

    def __iter__(self) -> Iterator[Positioned]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        skip = self._pass[1]
        # The DataLoader takes batch j from worker j mod W. A pass resumed at batch `skip` asks worker 0 first,
        # so worker w serves the slot ("role") whose batch comes next: (w + skip) mod W.
        role = (worker + skip) % num_workers
        done = worker_share(skip, role, num_workers)  # this slot's batches yielded before the resume
        quota = max(0, worker_share(self.batches_per_rank, role, num_workers) - done)
        tag = "eval" if self.mode == "eval" else self.epoch
        name = f"{self.seed}/{tag}/{self.rank}/{role}"  # str seeds are stable across runs
        rng = random.Random(name)
        limit = None  # raw samples in one pass of this slot's range (none: resampled)
        if self.mode == "resampled":
            samples = self._shuffled(self._resampled(role, num_workers, rng), rng)
        else:
            segs = self._slot_segments(role, num_workers)
            samples, limit = self._cycle(segs, rng), sum(b - a for _, a, b in segs)
        if self.bucket_weights is not None:
            steps = bucket_schedule(self.bucket_weights, self.batches_per_rank, f"{self.seed}/{tag}/buckets")
            return islice(self._bucket_batches(samples, name, done, steps[role::num_workers], limit), quota)
        read = self._pass[2 + role]
        return islice(self._batches(islice(samples, read, None), name, done, read), quota)

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

    def _batches(self, samples: Iterator[dict], name: str, index: int, read: int) -> Iterator[Positioned]:
        """Decode samples (skipping and counting bad ones) and collate them into batches.

        Augmentation draws from one rng per batch, seeded by the slot's `name` and the batch's `index` in it: a
        resumed slot skips raw samples undecoded and still augments its next batch as the first run did.
        `read` counts the raw samples the slot has read: the position that comes with each batch.
        """
        items, good = [], 0  # good: decoded since the counter last heard (shared counts cost a lock each)
        rng = random.Random(f"{name}/{index}")
        for sample in samples:
            read += 1
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
                yield Positioned(self.decoder.collate(items, rng), read)
                items, good, index = [], 0, index + 1
                rng = random.Random(f"{name}/{index}")

    # ------------------------------------------------------------------ aspect-ratio buckets

    def _bucket_batches(self, samples: Iterator[dict], name: str, done: int, steps: list[int],
                        limit: int | None) -> Iterator[Positioned]:
        """Batches of the scheduled buckets `steps` (this slot's), from the slot's `done`-th on.

        Grouping reads headers only, so a resumed slot replays its first `done` groups without decoding (and
        without counting their samples again) and rebuilds the same pending buffer: the resume is bit-exact.
        """
        batcher = BucketBatcher(self.decoder.bucket_sizes, self.batch_size, self.bucket_buffer * self.batch_size,
                                self.decoder.reshapes)

        def bad(index: int, error: BadSample) -> None:
            if index >= done:  # replayed groups were counted by the run that made them
                self.counter.bad(error)

        for index, (bucket, members, read) in enumerate(batcher.groups(samples, steps, self.decoder.bucket_of,
                                                                       limit, bad)):
            if index >= done:
                if bucket != steps[index]:  # a decoder that cannot reshape took its fullest bucket instead
                    self.counter.note("off_schedule", len(members))
                yield Positioned(self._bucket_batch(bucket, members, f"{name}/{index}"), read)

    def _bucket_batch(self, bucket: int, members: list, seed: str) -> dict:
        """Decode one group into `bucket` with the batch's rng; notes and bad samples counted."""
        rng, items = random.Random(seed), []
        for sample, own, note in members:
            try:
                items.append(self.decoder(sample, rng, bucket))
            except BadSample as error:
                self.counter.bad(error)
                continue
            for kind in (note, "borrowed" if own != bucket else None):
                if kind:
                    self.counter.note(kind)
        if not items:
            raise BadSamplesError(f"no sample of a batch decoded; {self.counter.describe()}")
        self.counter.good(len(items))
        # A sample whose header read but whose pixels did not: a repeat takes its place, because the grouping
        # (and so the resume) must not depend on decoding.
        items += [items[i % len(items)] for i in range(self.batch_size - len(items))]
        return self.decoder.collate(items, rng)

    def _shard_error(self, url: str, error: Exception, missing: int | None) -> None:
        """A shard that failed part-way (truncated tar, failed pipe command): count what it lost."""
        message = f"shard {url!r} ended early ({type(error).__name__}: {error})"
        self.counter.bad(BadSample("shard", message), n=missing or 1)


class EpochLoader(DataLoader):
    """DataLoader over pre-batched items that sets its ShardStream's epoch before each pass; resumable.

    Workers are persistent: besides saving start-up time, forking once per loader instead of once per epoch
    avoids CPython gh-112275 (3.11.7 here): a worker forked while another thread exits can deadlock.

    Resume follows Lightning's stateful-loader protocol: the fit loop puts `state_dict()` into checkpoints and
    calls `load_state_dict()` before a resumed run's first pass. The pass starts lazily (at its first batch,
    when the trainer's epoch is final: a checkpoint from an epoch's last batch resumes with the next epoch) and
    continues the saved position if the epoch matches. Resuming with another world size, worker count or batch
    size lands at the same fraction of the epoch, approximately.
    """

    def __init__(self, dataset: ShardStream, epoch_fn: Callable[[], int | None] | None = None, **kw) -> None:
        kw.setdefault("persistent_workers", kw.get("num_workers", 0) > 0)
        super().__init__(dataset, batch_size=None, **kw)
        self._epoch_fn, self._iters = epoch_fn, 0
        self._slots = max(1, self.num_workers)
        self._epoch, self._yielded, self._read = 0, 0, [0] * self._slots  # position of the current pass
        self._restored: dict | None = None

    def __iter__(self):
        return self._pass()

    def _pass(self) -> Iterator[dict]:
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        if self._iters and any(n for k, n in self.dataset.counter.summary().items() if k != "good"):
            log.warning("data (rank %d, %s): %s so far", self.dataset.rank, self.dataset.mode,
                        self.dataset.counter.describe())
        epoch, skip, read = self._start(self._iters if epoch is None else epoch, epoch is None)
        self._iters = epoch + 1 if self._epoch_fn is None else self._iters + 1
        self._epoch, self._yielded, self._read = epoch, skip, read
        self.dataset.start_pass(epoch, skip, read)
        batches = super().__iter__()
        try:
            for batch, read in batches:
                self._read[self._yielded % self._slots] = read  # batch j comes from worker j mod W
                self._yielded += 1
                yield batch
        except GeneratorExit:  # the consumer stopped early (limit_*_batches): workers stay for the next epoch
            raise
        except BaseException:
            # E.g. BadSamplesError: the re-raised worker error's traceback holds the iterator in a reference
            # cycle, so torch's own shutdown would run in the garbage collector with its queues half torn down
            # (5 s per worker). Stop the workers here.
            if hasattr(batches, "_shutdown_workers"):
                batches._shutdown_workers()
                self._iterator = None  # persistent workers are gone: the next epoch starts new ones
            raise

    def _start(self, epoch: int, free: bool) -> tuple[int, int, list[int]]:
        """(epoch, batches to skip, raw samples read per slot) of the next pass: a restored position if it is
        for this epoch (or the epoch is not the trainer's), else the start of `epoch`."""
        state, self._restored = self._restored, None
        if state is None or (not free and state["epoch"] != epoch):
            return epoch, 0, [0] * self._slots
        layout, n = state["layout"], len(self)
        rank = self.dataset.rank
        if layout == self._layout() and rank < len(state["read"]):
            return state["epoch"], state["batches"], list(state["read"][rank])
        skip = min(n, round(state["batches"] * n / max(1, layout["batches_per_rank"])))
        log.warning("data layout changed since the checkpoint (%s, now %s): resuming at batch %d of %d, the same "
                    "fraction of epoch %d, approximately", layout, self._layout(), skip, n, state["epoch"])
        size = self.dataset.batch_size
        return state["epoch"], skip, [worker_share(skip, k, self._slots) * size for k in range(self._slots)]

    def _layout(self) -> dict[str, int]:
        d = self.dataset
        return {"world_size": d.world_size, "workers": self._slots, "batch_size": d.batch_size,
                "batches_per_rank": d.batches_per_rank}

    @property
    def position(self) -> StreamPosition:
        """This rank's position after the last batch handed out (a finished pass: the next epoch's start)."""
        if self._yielded >= len(self):
            return StreamPosition(self._epoch + 1, 0, [0] * self._slots)
        return StreamPosition(self._epoch, self._yielded, list(self._read))

    def state_dict(self) -> dict:
        """`position` with every rank's read counts (a collective, as checkpoints are built on every rank)."""
        if self._restored is not None:  # restored, not started yet: still that position
            return self._restored
        epoch, batches, read = self.position
        return {"epoch": epoch, "batches": batches, "read": gather_per_rank(read), "layout": self._layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict`) at the next pass."""
        self._restored = state
