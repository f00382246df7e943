"""Aspect-ratio buckets: which (H, W) each image trains at, and which bucket each step of an epoch uses.

NovelAI's bucketing (and SDXL §2.2's multi-aspect training): a set of sizes of about the same area, each a
multiple of the networks' total downsampling; an image goes to the bucket of nearest aspect ratio (distance of
log H/W), is resized to cover it and cropped, and a batch holds one bucket. Its original size and crop offset
travel in the batch (SDXL §2.2 micro-conditioning: `original_size`, `crop_top_left`).

DDP ranks must agree on the bucket of each step (a rank on a larger shape makes the others wait, and compiled
graphs are per shape), so the bucket of step j is not the data's choice but a seeded schedule shared by all
ranks (`bucket_schedule`: as many batches per bucket as its share of the data, in a shuffled order, as
NovelAI). Each (rank, worker) slot then fills the scheduled bucket from its own samples through a bounded
buffer (`BucketBatcher`); which samples form which batch depends only on the samples' headers (their size),
never on an rng or on pixel decoding, so a resumed slot replays its grouping without decoding and continues
bit-exactly.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ldmlab.data.filters import BadSample

SMALL = ("upscale", "skip")  # images that must be upscaled to cover their bucket
OUTSIDE = ("nearest", "skip")  # aspect ratios beyond the extreme buckets'
Size = tuple[int, int]  # (H, W)


def make_buckets(area: int, step: int = 64, max_ratio: float = 2.0) -> list[Size]:
    """Sizes (H, W), multiples of `step`, of at most `area` pixels and the largest H for each W, with aspect
    ratio at most `max_ratio` either way (NovelAI's generation); sorted by H/W."""
    if step < 1 or area < step * step or max_ratio < 1:
        raise ValueError(f"buckets: area={area}, step={step}, max_ratio={max_ratio}: need step >= 1, "
                         f"area >= step², max_ratio >= 1")
    sizes = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(h / w, w / h) <= max_ratio + 1e-9:
            sizes.add((h, w))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def parse_buckets(spec: Any) -> list[Size] | None:
    """data.decoder.buckets → sizes: null, a list of [H, W], or {area, step, max_ratio} (make_buckets)."""
    if spec is None:
        return None
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        unknown = set(spec) - {"area", "step", "max_ratio"}
        if unknown or "area" not in spec:
            raise ValueError(f"data.decoder.buckets={dict(spec)}: give area (and optionally step, max_ratio), "
                             f"e.g. {{area: 65536, step: 64, max_ratio: 2.0}}, or a list of [H, W]")
        return make_buckets(int(spec["area"]), int(spec.get("step", 64)), float(spec.get("max_ratio", 2.0)))
    sizes = [tuple(int(x) for x in s) for s in spec]
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"data.decoder.buckets={list(spec)}: give a list of [H, W] pairs, e.g. [[256, 256], "
                         f"[192, 320]], or {{area: 65536, step: 64, max_ratio: 2.0}}")
    return sorted(set(sizes), key=lambda s: (s[0] / s[1], s[0]))


def log_ratio(h: int, w: int) -> float:
    """log(H/W): the distance between aspect ratios is the difference of these."""
    return math.log(h / w)


def nearest_bucket(sizes: Sequence[Size], h: int, w: int) -> int:
    """Index of the bucket of nearest aspect ratio to an h×w image; among equal ratios, nearest area."""
    r, a = log_ratio(h, w), math.log(h * w)
    return min(range(len(sizes)), key=lambda i: (round(abs(log_ratio(*sizes[i]) - r), 9),
                                                 abs(math.log(sizes[i][0] * sizes[i][1]) - a)))


def assign(sizes: Sequence[Size], h: int, w: int, small: str, outside: str, where: str) -> tuple[int, str | None]:
    """(bucket, note) of an h×w image under the `small` and `outside` policies; BadSample when skipped.

    note: "outside_ratio" (put in the extreme bucket), "upscaled" (smaller than its bucket), or None.
    """
    b = nearest_bucket(sizes, h, w)
    note = None
    ratios = [log_ratio(*s) for s in sizes]
    if not min(ratios) - 1e-9 <= log_ratio(h, w) <= max(ratios) + 1e-9:
        if outside == "skip":
            raise BadSample("shape", f"{where}: aspect ratio {w}×{h} is outside the buckets' range "
                                     f"(data.decoder.outside_ratio=skip)")
        note = "outside_ratio"
    H, W = sizes[b]
    if h < H or w < W:
        if small == "skip":
            raise BadSample("shape", f"{where}: image {w}×{h} is smaller than its bucket {W}×{H} "
                                     f"(data.decoder.small_images=skip)")
        note = note or "upscaled"
    return b, note


def cover_box(h: int, w: int, H: int, W: int) -> Size:
    """The (h', w') to resize an h×w image to so it covers H×W with its aspect ratio kept."""
    scale = max(H / h, W / w)
    return max(H, round(h * scale)), max(W, round(w * scale))


def bucket_schedule(weights: Sequence[float], n: int, seed: str) -> list[int]:
    """The bucket of each of `n` steps: batches per bucket in proportion to `weights` (largest remainder), in a
    seeded shuffled order (NovelAI); a function of its arguments, so the same on every rank."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("bucket weights are all 0: no bucket has samples")
    quotas = [w * n / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    steps = [b for b, c in enumerate(counts) for _ in range(c)]
    random.Random(seed).shuffle(steps)
    return steps


class BucketBatcher:
    """Pending samples per bucket; `take` hands out a scheduled bucket's batch when it can.

    The buffer is bounded: when it holds `cap` samples (or the slot has read its whole range) and the scheduled
    bucket is still short, the batch is filled with the nearest buckets' samples, oldest first, which the
    decoder resizes to cover the scheduled size (`reshapes`). A decoder that cannot resize (latents) instead
    takes its fullest bucket off the schedule: correct under DDP, only not the same shape on every rank.
    """

    def __init__(self, sizes: Sequence[Size], batch_size: int, cap: int, reshapes: bool) -> None:
        self.batch_size, self.cap, self.reshapes = batch_size, max(cap, batch_size), reshapes
        self.pending: list[deque] = [deque() for _ in sizes]
        self.total = 0
        ratios = [log_ratio(*s) for s in sizes]
        self.near = [sorted(range(len(sizes)), key=lambda j, i=i: (abs(ratios[i] - ratios[j]), j))
                     for i in range(len(sizes))]

    def add(self, bucket: int, item: Any) -> None:
        """Buffer an item of `bucket`."""
        self.pending[bucket].append(item)
        self.total += 1

    def take(self, bucket: int, exhausted: bool = False) -> tuple[int, list] | None:
        """(bucket, batch_size items) for the scheduled `bucket`, or None: read more first."""
        if len(self.pending[bucket]) >= self.batch_size:
            return bucket, self._pop([bucket])
        if self.total < self.batch_size or not (exhausted or self.total >= self.cap):
            return None
        if self.reshapes:
            return bucket, self._pop(self.near[bucket])
        full = [j for j, q in enumerate(self.pending) if len(q) >= self.batch_size]
        if not full:
            return None
        return (j := max(full, key=lambda j: len(self.pending[j]))), self._pop([j])

    def groups(self, samples: Iterator[dict], steps: Sequence[int], bucket_of: Callable[[dict], tuple[int, Any]],
               limit: int | None, on_bad: Callable[[int, BadSample], None]) -> Iterator[tuple[int, list, int]]:
        """(bucket, [(sample, own bucket, note)], raw samples read) for each scheduled bucket of `steps`.

        A function of the samples' headers (`bucket_of`) alone. `limit`: raw samples in one pass of the slot's
        range; once read, short buckets are filled at once rather than from repeats. `on_bad(step, error)`
        hears of samples `bucket_of` refused.
        """
        read = 0
        for index, bucket in enumerate(steps):
            while (group := self.take(bucket, limit is not None and read >= limit)) is None:
                sample = next(samples)
                read += 1
                try:
                    own, note = bucket_of(sample)
                except BadSample as error:
                    on_bad(index, error)
                    continue
                self.add(own, (sample, own, note))
            yield group[0], group[1], read

    def _pop(self, order: Iterable[int]) -> list:
        items = []
        for j in order:
            queue = self.pending[j]
            while queue and len(items) < self.batch_size:
                items.append(queue.popleft())
        self.total -= len(items)
        return items


def probe_weights(samples: Iterable[dict], bucket_of: Callable[[dict], tuple[int, str | None]], buckets: int,
                  n: int) -> list[float]:
    """Samples per bucket among the first `n` usable ones of `samples` (the schedule's weights)."""
    counts, seen = [0.0] * buckets, 0
    for sample in samples:
        try:
            b, _ = bucket_of(sample)
        except BadSample:
            continue
        counts[b] += 1
        seen += 1
        if seen >= n:
            break
    return counts
