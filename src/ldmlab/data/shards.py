"""Shard urls, per-shard sample counts and the split of an epoch's samples over ranks and workers.

A shard url is a local path, or anything webdataset's `gopen` opens (`pipe:aws s3 cp s3://b/x.tar -`,
`https://...`). Sample counts come from `manifest.json` next to the shards ("counts": {shard name: samples};
written by make_shards, cache_latents and the demo), also for remote shards (the manifest url is the shard
url with the shard's file name replaced), else from the tar headers of local shards.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import webdataset as wds
from hydra.errors import CompactHydraException

from ldmlab.data.tarstream import sample_key, shard_samples, tar_members

Urls = str | Sequence[str]
Segment = tuple[str, int, int]  # (url, first sample, end sample) of one shard, end exclusive
MANIFEST = "manifest.json"
_TAR_TOKEN = re.compile(r"\S+\.tar(\.gz)?\b")


class DataConfigError(ValueError, CompactHydraException):
    """A data config or shard problem found before training: one line naming the field or file and the fix
    (a CompactHydraException, so Hydra prints the line without a traceback, as ldmlab.validate.ConfigError)."""


def is_local(url: str) -> bool:
    """Whether `url` is a file path (as opposed to pipe:, http:, s3:, ... which webdataset also opens)."""
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(urls: Urls) -> list[str]:
    """Brace-expand (and glob local) shard urls; raise a one-line error when local shards don't exist."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if is_local(url) and any(c in url for c in "*?["):
                out += sorted(glob.glob(os.path.expanduser(url)))
            else:
                out.append(os.path.expanduser(url) if is_local(url) else url)
    missing = [u for u in out if is_local(u) and not os.path.isfile(u)]
    if not out or len(missing) == len(out):
        raise FileNotFoundError(f"no shards match {urls!r}: check the directory, and write shard ranges as "
                                f"brace expansions, e.g. 'dir/train-{{000000..000003}}.tar'")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(out)} shards in {urls!r} do not exist, "
                                f"first {missing[0]!r}: fix the brace range")
    return out


def shard_name(url: str) -> str:
    """The shard's file name: the basename of a path or url, or of the `*.tar` argument of a pipe: command."""
    if url.startswith("pipe:"):
        tokens = [m.group(0) for m in _TAR_TOKEN.finditer(url)]
        return os.path.basename(tokens[-1]) if tokens else url
    return os.path.basename(urlparse(url).path if not is_local(url) else url)


def sibling_url(url: str, name: str) -> str:
    """`url` with the shard's file name replaced by `name` (where its manifest lives)."""
    if is_local(url):
        return os.path.join(os.path.dirname(os.path.abspath(url)), name)
    shard = shard_name(url)
    head, sep, tail = url.rpartition(shard)
    return head + name + tail if sep else url


def read_manifest(url: str) -> dict:
    """manifest.json at a path or url as a dict, or {} when it cannot be read."""
    if not is_local(url):
        return _read_json(url, None)
    return _read_json(url, os.stat(url).st_mtime_ns) if os.path.isfile(url) else {}


@cache
def _read_json(url: str, version: int | None) -> dict:
    """JSON at `url`, cached per (url, local file's mtime): a rewritten manifest is read again."""
    try:
        with wds.gopen(url, "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):  # no manifest next to remote shards: counts stay unknown
        return {}


def scan_count(path: str) -> int:
    """Number of samples (distinct keys) in a local shard, from its headers (up to a truncation)."""
    stat = os.stat(path)
    return _scan_count(path, stat.st_mtime_ns, stat.st_size)


@cache
def _scan_count(path: str, mtime: int, size: int) -> int:
    """scan_count, cached per file version."""
    keys: set[str] = set()
    try:
        if path.endswith(".tar"):
            with open(path, "rb") as f:
                keys.update(sample_key(name) or "" for name, _ in tar_members(f, with_data=False))
        else:  # compressed shards: tarfile decompresses
            with tarfile.open(path) as tar:
                keys.update(sample_key(m.name) or "" for m in tar if m.isreg())
    except (EOFError, ValueError, tarfile.TarError):  # truncated or corrupt: the loader counts what it lacks
        pass
    keys.discard("")
    return len(keys)


def shard_count(url: str) -> int | None:
    """Samples in one shard: its manifest's count, else a tar-header scan (local), else None (unknown)."""
    count = read_manifest(sibling_url(url, MANIFEST)).get("counts", {}).get(shard_name(url))
    if count is None and is_local(url):
        count = scan_count(url)
    return count


def shard_counts(urls: Sequence[str], why: str = "exact epochs") -> list[int]:
    """Per-shard sample counts; a one-line error naming the shard when one is unknown."""
    counts = [shard_count(u) for u in urls]
    unknown = [u for u, c in zip(urls, counts) if c is None]
    if unknown:
        raise ValueError(f"{why} need sample counts but shard {unknown[0]!r} has none: put a {MANIFEST} "
                         f"(make_shards writes one) next to the shards, or set data.samples_per_epoch")
    return counts  # type: ignore[return-value]


def empty_shards(urls: Sequence[str], counts: Sequence[int] | None = None) -> list[str]:
    """The shards of `urls` that hold no sample: count 0 when `counts` are known, else local files of 0 bytes
    (a cheap stat, for resampled epochs, which never count)."""
    if counts is not None:
        return [u for u, n in zip(urls, counts) if n == 0]
    return [u for u in urls if is_local(u) and os.path.isfile(u) and os.path.getsize(u) == 0]


def count_samples(urls: Sequence[str]) -> int:
    """Total samples in `urls` (manifest counts, or tar-header scans of local shards)."""
    return sum(shard_counts(urls, "counting samples"))


def manifest_urls(root: str, split: str) -> list[str]:
    """Paths of the shards of `split` listed in `<root>/manifest.json`, in name order."""
    manifest = read_manifest(os.path.join(root, MANIFEST))
    if not manifest:
        raise FileNotFoundError(f"no {MANIFEST} in data.root={root!r}: give the directory make_shards or "
                                f"cache_latents wrote, or set data.train_urls instead")
    names = sorted(n for n in manifest.get("counts", {}) if n.startswith(f"{split}-"))
    return [os.path.join(root, n) for n in names]


def worker_share(n: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` of `num_workers` makes out of a rank's `n`: they differ by at most one."""
    return n // num_workers + (worker < n % num_workers)


def slot_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """split_by_node then split_by_worker (as webdataset's), but a slot past the last shard reuses one."""
    own = list(urls)[rank::world_size][worker::num_workers]
    return own or [urls[(rank + world_size * worker) % len(urls)]]


def segments(urls: Sequence[str], counts: Sequence[int], start: int, stop: int) -> list[Segment]:
    """Shard pieces holding positions [start, stop) of the concatenation of `urls` (no wrap-around)."""
    out, offset = [], 0
    for url, n in zip(urls, counts):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((url, lo - offset, hi - offset))
        offset += n
    return out


def wrapped(lo: int, hi: int, start: int, stop: int) -> list[tuple[int, int]]:
    """Intervals of positions lo + (i mod (hi - lo)) for i in [start, stop): padding by wrap-around."""
    size, out = hi - lo, []
    while start < stop:
        a = start % size
        b = min(size, a + stop - start)
        out.append((lo + a, lo + b))
        start += b - a
    return out


def read_segment(url: str, start: int, stop: int | None,
                 on_error: Callable[[str, Exception, int | None], None]) -> Iterator[dict]:
    """Samples [start, stop) of one shard; a read error (truncated tar, failed pipe) ends the shard early.

    `on_error(url, error, missing)` hears about it; `missing` is how many wanted samples were lost (None when
    the shard's length is unknown).
    """
    i = 0
    try:
        for sample in shard_samples(url):
            if stop is not None and i >= stop:
                return
            if i >= start:
                yield sample
            i += 1
    except Exception as error:  # noqa: BLE001 - a read failure loses the rest of this shard, not the run
        on_error(url, error, None if stop is None else max(stop - max(i, start), 1))
        return
    if stop is not None and i < stop:  # a stale manifest promised more
        error = EOFError(f"shard ended after {i} samples; its {MANIFEST} count promised at least {stop}")
        on_error(url, error, stop - max(i, start))


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a sibling temp dir and rename it to `final`, unless `final/manifest.json` exists.

    A crash never leaves a half-written dataset under `final`; when several processes race, the first rename
    wins and the others keep its result.
    """
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the dataset may be shared
        os.rename(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():  # not "another process finished first"
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
