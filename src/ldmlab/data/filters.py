"""Bad samples: skipped, counted per kind over all DataLoader workers of a rank, logged, and a hard stop.

A few broken samples are normal in web-scale data (truncated downloads, odd encodings) and must not kill a
week-long run; many mean a broken dataset or a wrong config (e.g. `required: [text]` on shards without
captions), which should stop the run at once with a message that says which field, shard and fix.
"""

from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger("ldmlab.data")

KINDS = ("undecodable", "missing", "shape", "shard")  # why a sample was skipped
# Samples used but changed by aspect-ratio bucketing (ldmlab.data.buckets): counted, not bad.
NOTES = ("upscaled", "outside_ratio", "borrowed", "off_schedule")
_LOGGED_PER_PROCESS = 5  # full messages (events) per worker; later ones are only counted (the summary has them)


class BadSample(Exception):
    """A sample that cannot be used; `kind` is one of KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BadSamplesError(RuntimeError):
    """More bad samples than data.max_bad_fraction allows: the data or the data config is broken."""


def check_fraction(value: float) -> None:
    """A one-line error unless 0 <= data.max_bad_fraction <= 1."""
    if not 0 <= value <= 1:
        raise ValueError(f"data.max_bad_fraction={value} must be in [0, 1], e.g. 0.01")


class SampleCounter:
    """Good and bad sample counts of one rank, in shared memory so every worker adds to the same totals."""

    def __init__(self, max_bad_fraction: float = 0.01, min_samples: int = 200) -> None:
        check_fraction(max_bad_fraction)
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self._counts = multiprocessing.Array("q", 1 + len(KINDS) + len(NOTES))  # [good, bad per kind, notes]
        self._local = [0, 0]  # this process's [good, bad]: a worker that never sees a good sample stops
        self._events = 0  # this process's bad events: a shard that lost n samples is one event, logged whole
        self._first: str | None = None

    def good(self, n: int = 1) -> None:
        """Count `n` usable samples."""
        with self._counts.get_lock():
            self._counts[0] += n
        self._local[0] += n

    def bad(self, error: BadSample, n: int = 1) -> None:
        """Count and log a skipped sample (or `n` samples lost with a shard); stop when too many are bad."""
        with self._counts.get_lock():
            self._counts[1 + KINDS.index(error.kind)] += n
        self._local[1] += n
        self._events += 1
        self._first = self._first or str(error)
        if self._events <= _LOGGED_PER_PROCESS:
            log.warning("skipped %s: %s", "a bad sample" if n == 1 else f"{n} samples", error)
        self.check()

    def note(self, kind: str, n: int = 1) -> None:
        """Count `n` samples used with a change (a kind of NOTES, e.g. upscaled to cover their bucket)."""
        with self._counts.get_lock():
            self._counts[1 + len(KINDS) + NOTES.index(kind)] += n

    def summary(self) -> dict[str, int]:
        """{"good": n, "bad": n, <kind>: n, <note>: n} over all workers so far."""
        good, *rest = self._counts[:]
        bad, notes = rest[:len(KINDS)], rest[len(KINDS):]
        return {"good": good, "bad": sum(bad), **dict(zip(KINDS, bad)), **dict(zip(NOTES, notes))}

    def describe(self) -> str:
        """One line: how many samples were bad, by kind."""
        s = self.summary()
        kinds = ", ".join(f"{k} {s[k]}" for k in KINDS if s[k])
        notes = ", ".join(f"{k} {s[k]}" for k in NOTES if s[k])
        return f"{s['bad']} of {s['good'] + s['bad']} samples bad ({kinds or 'none'})" + (
            f"; bucketing changed {notes}" if notes else "")

    def check(self) -> None:
        """Raise BadSamplesError when the bad fraction exceeds the limit (after `min_samples` samples)."""
        s = self.summary()
        seen = s["good"] + s["bad"]
        if seen >= self.min_samples and s["bad"] > self.max_bad_fraction * seen:
            raise BadSamplesError(f"{self.describe()} on this rank, more than data.max_bad_fraction="
                                  f"{self.max_bad_fraction}; first: {self._first} "
                                  f"(or raise data.max_bad_fraction)")
        if self._local[0] == 0 and self._local[1] >= self.min_samples:
            raise BadSamplesError(f"no usable sample among the first {self._local[1]} a DataLoader worker "
                                  f"read; first: {self._first}")
