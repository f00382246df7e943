"""`data=folder`: an image folder (class subfolders, .txt captions) or a .jsonl manifest, sharded once by
make_shards under `<data_dir>/folder/` (`FolderShards`, the ShardDataModule's source) and then streamed by the
same module as `data=wds`."""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from ldmlab.data.make_shards import MakeShardsArgs, make_shards
from ldmlab.data.shards import DataConfigError, build_once


def fingerprint(src: Path) -> list:
    """What changes when files are added, removed or renamed: (path, mtime_ns) of src and its folders."""
    if src.is_file():
        return [str(src), src.stat().st_mtime_ns, src.stat().st_size]
    return [(str(Path(d)), os.stat(d).st_mtime_ns) for d, _, _ in sorted(os.walk(src))]


class FolderShards:
    """`data=folder`'s shard source: make_shards of `src` written once (rebuilt when src changes)."""

    def __init__(self, src: str | None = None, data_dir: str = "data", resize: int | None = None,
                 val_fraction: float = 0.05, shard_size: int = 1000, caption: str | None = None) -> None:
        self.src, self.data_dir = src, data_dir
        self.shard_args = {"resize": resize, "val_fraction": val_fraction, "max_count": shard_size}
        if caption is not None:  # of images without a .txt (DreamBooth's instance prompt); absent: same hash
            self.shard_args["caption"] = caption
        self._root: str | None = None

    @property
    def root(self) -> str:
        """`<data_dir>/folder/<src name>-<hash of src, its folder mtimes and the shard arguments>`."""
        if self._root is None:
            if self.src is None:
                raise DataConfigError("data=folder needs data.source.src=<image folder or .jsonl manifest>")
            src = Path(self.src).expanduser().resolve()
            if not src.exists():
                raise DataConfigError(f"data.source.src={self.src} does not exist: give an image folder or a "
                                      f".jsonl file")
            key = json.dumps([str(src), fingerprint(src), self.shard_args], sort_keys=True)
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            self._root = str(Path(self.data_dir) / "folder" / f"{src.stem}-{digest}")
        return self._root

    def prepare(self) -> None:
        """Shard the folder once (built in a temp dir and renamed, so never half-done)."""
        build_once(Path(self.root), partial(_shard_into, src=str(self.src), shard_args=self.shard_args))


def _shard_into(out: Path, src: str, shard_args: dict[str, Any]) -> None:
    """make_shards of `src` into the (temporary) directory `out`."""
    make_shards(MakeShardsArgs(src=src, out=str(out), overwrite=True, **shard_args))
