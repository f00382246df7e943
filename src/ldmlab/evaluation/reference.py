"""The real side of FID/KID: uint8 images (and captions) from a run's data, and their statistics cached on disk,
keyed by the data, the feature network, the resolution and the count (a change of any one recomputes them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldmlab.evaluation.samples import to_uint8
from ldmlab.metrics import FeatureStatistics, broadcast_object

Reference = tuple[FeatureStatistics, Tensor | None]


def real_batches(loader: Any, n: int, vae: Any = None, captions: list[str] | None = None,
                 finish: Callable[[dict], dict] | None = None) -> Iterator[Tensor]:
    """Up to n real images from `loader` as uint8 batches; cached latents are decoded with `vae` (the decoder the
    LDM's samples pass through too). `finish` completes a batch's decoding (a DataModule's
    `on_after_batch_transfer`); the batches' captions are appended to `captions` when given."""
    seen = 0
    for batch in loader:
        if seen >= n:
            return
        batch = finish(batch) if finish is not None else batch
        if "image" in batch:
            pixels = to_uint8(batch["image"])
        elif vae is not None:
            latents = batch["latent"].to(next(vae.parameters()).device).float()
            with torch.no_grad():
                pixels = to_uint8(vae.decode(latents))
        else:
            raise ValueError("the data holds latents and there is no VAE to decode them: give the model a VAE "
                             "(model.vae) or evaluate against image data (data=wds)")
        pixels = pixels[: n - seen]
        if captions is not None and "text" in batch:
            captions.extend(list(batch["text"])[: len(pixels)])
        seen += len(pixels)
        yield pixels


def describe_data(datamodule: Any) -> Any:
    """What identifies a reference: a shard module's validation shards and decoder settings, else the class."""
    from ldmlab.data.module import ShardDataModule

    if isinstance(datamodule, ShardDataModule):
        return {"val": datamodule.val_url_list(), "decoder": repr(datamodule.decoder)}
    return type(datamodule).__name__


def stats_path(stats_dir: str | Path, data: Any, network: str, n: int) -> Path:
    """`<stats_dir>/<network>_n<n>_<hash of the data description>.safetensors`."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in network)
    return Path(stats_dir) / f"{safe}_n{n}_{digest}.safetensors"


def cached_reference(path: Path, compute: Callable[[], Reference], write: bool = True) -> Reference:
    """Statistics (and feature rows) from `path`, else `compute()`d (a collective) and written there by the rank
    that has `write`. Every rank takes rank 0's view of whether the file exists, so all compute or none does."""
    rows_path = path.with_suffix(".rows.safetensors")
    if broadcast_object(path.exists()):
        rows = load_file(str(rows_path))["rows"] if rows_path.exists() else None
        return FeatureStatistics.load(path), rows
    stats, rows = compute()
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        if rows is not None:  # the rows first: the statistics file is what says the cache is complete
            save_file({"rows": rows.cpu().contiguous()}, str(rows_path))
        stats.save(path)
    return stats, rows
