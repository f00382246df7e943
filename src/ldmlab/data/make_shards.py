"""Write WebDataset shards from an image folder or a JSONL manifest.

    python -m ldmlab.data.make_shards src=<folder or .jsonl> out=<dir> [resize=256] [max_count=1000]
        [max_bytes=500M] [val_fraction=0.01] [format=jpg] [workers=8]

Sources:
* a folder: images anywhere below it; a top-level subfolder per class (label = index in sorted folder names)
  or no subfolders at all (no labels); `photo.txt` next to `photo.jpg` is its caption.
* a .jsonl file: one object per line, {"image": path (relative to the file), "label": int | "class": str,
  "text" | "caption": str, "key": str, anything else → the sample's .json}.

Output: `{split}-%06d.tar` with `{key}.{jpg|png|webp}`, `{key}.cls`, `{key}.txt`, `{key}.json`; `classes.json`;
and `manifest.json` (written last: shard names → sample counts, which the loader uses for epoch length).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import webdataset as wds
from omegaconf import MISSING
from PIL import Image
from tqdm import tqdm

from ldmlab.data.cli import parse_args, parse_size

FORMAT_VERSION = 1
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SAVE_AS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
SHARD_GLOB = "*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class MakeShardsArgs:
    """Arguments of make_shards (key=value on the command line)."""

    src: str = field(default=MISSING, metadata=_help("image folder, or a .jsonl manifest"))
    out: str = field(default=MISSING, metadata=_help("output directory"))
    resize: int | None = field(default=None, metadata=_help("downscale the shorter side to this (never up)"))
    format: str | None = field(default=None, metadata=_help("re-encode all images as jpg|png|webp"))
    quality: int = field(default=95, metadata=_help("JPEG/WebP quality when re-encoding"))
    max_count: int | None = field(default=1000, metadata=_help("samples per shard"))
    max_bytes: str | None = field(default=None, metadata=_help("bytes per shard, e.g. 500M (first limit wins)"))
    val_fraction: float = field(default=0.0, metadata=_help("share of samples written to val-*.tar"))
    shuffle: bool = field(default=True, metadata=_help("seeded random order (class folders would "
                                                       "otherwise give one-class shards)"))
    seed: int = field(default=0, metadata=_help("seed of the shuffle and the val split"))
    workers: int = field(default=0, metadata=_help("processes that read and re-encode (0: this one)"))
    overwrite: bool = field(default=False, metadata=_help("replace shards already in out"))
    caption: str | None = field(default=None, metadata=_help("caption of images without a same-name .txt"))


@dataclass
class Item:
    """One source image and what is known about it."""

    path: str
    key: str
    label: int | None = None
    text: str | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- listing sources


def _key(relpath: str, taken: set[str]) -> str:
    """A tar-safe, unique key from a relative path (webdataset splits keys at the first dot)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(relpath)[0]).strip("_") or "sample"
    base, n = key, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def _caption(image: Path) -> str | None:
    """Text of the same-name .txt next to an image, or None."""
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else None


def list_folder(src: Path) -> tuple[list[Item], list[str] | None]:
    """Items of an image folder and its class names (top-level subfolders), or None when unlabelled."""
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"src={src} holds no .jpg/.jpeg/.png/.webp images")
    rel = [p.relative_to(src) for p in images]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1}) or None
    loose = [r for r in rel if len(r.parts) == 1]
    if classes and loose:
        raise ValueError(f"src={src} has class subfolders but also images at its top level ({loose[0]}): "
                         f"move those into a class folder")
    taken: set[str] = set()
    items = []
    for path, r in zip(images, rel):
        label = classes.index(r.parts[0]) if classes else None
        meta = {"path": str(r), **({"class": r.parts[0]} if classes else {})}
        items.append(Item(str(path), _key(str(r), taken), label, _caption(path), meta))
    return items, classes


def list_jsonl(src: Path) -> tuple[list[Item], list[str] | None]:
    """Items of a JSONL manifest and its class names (from "class" strings), or None."""
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if "image" not in row:
            raise ValueError(f"{src} line {i + 1} has no \"image\" field: give each line an image path")
    classes = sorted({r["class"] for r in rows if "class" in r}) or None
    taken: set[str] = set()
    items = []
    for row in rows:
        path = Path(row["image"]) if os.path.isabs(row["image"]) else src.parent / row["image"]
        label = row.get("label", classes.index(row["class"]) if classes and "class" in row else None)
        text = row.get("text", row.get("caption"))
        meta = {k: v for k, v in row.items() if k not in ("key", "text", "caption")}
        items.append(Item(str(path), _key(str(row.get("key", row["image"])), taken), label, text, meta))
    return items, classes


# ---------------------------------------------------------------- encoding one sample


def encode(item: Item, resize: int | None, fmt: str | None, quality: int) -> dict | str:
    """The wds sample of an item, or a one-line reason why it was skipped."""
    try:
        data = Path(item.path).read_bytes()
        image = Image.open(io.BytesIO(data))
        ext = PIL_EXT.get(image.format)
        size = image.size
        if (resize and min(size) > resize) or (fmt and fmt != ext) or ext is None:
            data, ext, size = _reencode(image, resize, fmt or ext or "png", quality)
        else:
            image.verify()  # cheap integrity check (PNG CRCs, headers) of bytes copied unchanged
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and reported, not fatal
        return f"{item.path}: {type(e).__name__}: {e}"
    meta = {**item.meta, "width": size[0], "height": size[1]}
    sample = {"__key__": item.key, ext: data, "json": json.dumps(meta, sort_keys=True).encode()}
    if item.label is not None:
        sample["cls"] = str(int(item.label)).encode()
    if item.text is not None:
        sample["txt"] = str(item.text).encode("utf-8")
    return sample


def _reencode(image: Image.Image, resize: int | None, ext: str, quality: int) -> tuple[bytes, str, tuple]:
    """Decode, downscale the shorter side to `resize` (if larger), encode as `ext`."""
    from ldmlab.data.transforms import resize_shorter

    image = image.convert("RGB")
    if resize and min(image.size) > resize:
        image = resize_shorter(image, resize)
    buf = io.BytesIO()
    image.save(buf, format=SAVE_AS[ext], **({"quality": quality} if ext in ("jpg", "webp") else {}))
    return buf.getvalue(), ext, image.size


# ---------------------------------------------------------------- writing shards


class ShardSink:
    """Writes `{split}-%06d.tar`, starting a new shard at `max_count` samples or `max_bytes` bytes."""

    def __init__(self, out: Path, split: str, max_count: int | None, max_bytes: int | None) -> None:
        self.out, self.split, self.max_count, self.max_bytes = out, split, max_count, max_bytes
        self.counts: dict[str, int] = {}
        self._writer: wds.TarWriter | None = None
        self._name, self._bytes = "", 0

    def write(self, sample: dict) -> None:
        """Append one sample, rolling over to a new shard when this one is full."""
        # tar: a 512-byte header per file, data padded to 512-byte blocks
        size = sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))
        if self._writer is None or self._full(size):
            self._open(f"{self.split}-{len(self.counts):06d}.tar")
        self._writer.write(sample)
        self.counts[self._name] += 1
        self._bytes += size

    def _full(self, size: int) -> bool:
        """Whether `size` more bytes would break a limit (a shard always takes at least one sample)."""
        n = self.counts[self._name]
        too_many = self.max_count and n >= self.max_count
        too_big = self.max_bytes and n and self._bytes + size > self.max_bytes
        return bool(too_many or too_big)

    def _open(self, name: str) -> None:
        self.close()
        # Fixed int mtime/owner: bytes depend on the samples only (a float mtime adds a PAX header per file).
        self._writer = wds.TarWriter(str(self.out / name), encoder=False, mtime=0, user="ldmlab",
                                     group="ldmlab")
        self._name, self.counts[name], self._bytes = name, 0, 1024  # 1024: the tar's end-of-archive blocks

    def close(self) -> None:
        """Finish the current shard."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def split_items(items: list[Item], val_fraction: float, shuffle: bool, seed: int) -> dict[str, list[Item]]:
    """{"train": [...], "val": [...]}: a seeded random val subset; each split shuffled or in source order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    splits = {"train": order[n_val:], "val": order[:n_val]}
    return {s: [items[i] for i in (idx if shuffle else sorted(idx))] for s, idx in splits.items() if idx}


def _encoded(items: Sequence[Item], args: MakeShardsArgs, pool: multiprocessing.pool.Pool | None) -> Iterable:
    """Samples (or skip reasons) of `items`, in order, encoded in `pool` when there is one."""
    fn = partial(encode, resize=args.resize, fmt=args.format, quality=args.quality)
    return pool.imap(fn, items, chunksize=16) if pool is not None else map(fn, items)


def write_split(out: Path, split: str, items: list[Item], args: MakeShardsArgs, pool=None) -> tuple[dict, list]:
    """Write one split's shards with a progress bar; ({shard: count}, [skip reasons])."""
    sink = ShardSink(out, split, args.max_count, parse_size(args.max_bytes))
    skipped = []
    with tqdm(total=len(items), unit="img", desc=f"{split} shards", file=sys.stderr) as bar:
        for result in _encoded(items, args, pool):
            if isinstance(result, str):
                skipped.append(result)
                bar.set_postfix(skipped=len(skipped))
            else:
                sink.write(result)
            bar.update()
    sink.close()
    return sink.counts, skipped


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create `out`; refuse (or, with overwrite, clear) a directory that already holds shards."""
    if (out / "manifest.json").exists() or any(out.glob(SHARD_GLOB)):
        if not overwrite:
            raise FileExistsError(f"out={out} already holds shards: pass overwrite=true or choose another out")
        for path in [*out.glob(SHARD_GLOB), out / "manifest.json", out / "classes.json"]:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def make_shards(args: MakeShardsArgs) -> Path:
    """Write the shards, classes.json and manifest.json described by `args`; returns the output directory."""
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if args.format is not None and args.format not in SAVE_AS:
        raise ValueError(f"format={args.format!r}: use one of {sorted(SAVE_AS)}")
    if not src.exists():
        raise FileNotFoundError(f"src={src} does not exist: give an image folder or a .jsonl manifest")
    items, classes = list_jsonl(src) if src.is_file() else list_folder(src)
    if args.caption is not None:
        items = [replace(item, text=args.caption) if item.text is None else item for item in items]
    _prepare_out(out, args.overwrite)
    pool = multiprocessing.Pool(args.workers) if args.workers > 0 else None  # before tqdm starts its thread
    counts, skipped, splits = {}, [], {}
    try:
        for split, split_list in split_items(items, args.val_fraction, args.shuffle, args.seed).items():
            split_counts, split_skipped = write_split(out, split, split_list, args, pool)
            counts.update(split_counts)
            skipped += split_skipped
            splits[split] = {"samples": sum(split_counts.values()), "shards": len(split_counts)}
    finally:
        if pool is not None:
            pool.close()
    if classes:
        (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    manifest = {"format": FORMAT_VERSION, "kind": "images", "source": str(src.resolve()), "args": asdict(args),
                "classes": classes, "splits": splits, "counts": counts, "skipped": len(skipped),
                "skipped_examples": skipped[:20]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks "complete"
    for reason in skipped[:5]:
        print(f"skipped {reason}", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry: parse key=value arguments and write the shards."""
    args = parse_args(MakeShardsArgs, sys.argv[1:] if argv is None else argv, __doc__)
    try:
        out = make_shards(args)
    except (OSError, ValueError) as e:  # one line naming the argument or file and the fix, not a traceback
        sys.exit(f"error: {e}")
    manifest = json.loads((out / "manifest.json").read_text())
    summary = ", ".join(f"{s}: {v['samples']} samples in {v['shards']} shards"
                        for s, v in manifest["splits"].items())
    print(f"wrote {out}: {summary}; skipped {manifest['skipped']}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
