"""WebDataset pipelines, decoders, transforms, shard writer and sources, and the one shard DataModule.

Names are imported lazily (PEP 562), so `python -m ldmlab.data.make_shards` starts without importing
Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ldmlab.data.demo": ["DemoShards", "DemoSpec", "build_demo_shards", "class_names", "load_photo"],
    "ldmlab.data.transforms": ["ImageTransform", "center_crop", "random_crop", "random_hflip", "resize_shorter",
                               "to_tensor"],
    "ldmlab.data.shards": ["DataConfigError", "count_samples", "expand_urls"],
    "ldmlab.data.pipeline": ["EpochLoader", "ShardStream", "StreamPosition"],
    "ldmlab.data.filters": ["BadSamplesError"],
    "ldmlab.data.decoders": ["Decoder", "ImageDecoder"],
    "ldmlab.data.conditions": ["InpaintDecoder", "LowResDecoder"],
    "ldmlab.data.masks": ["MaskGenerator"],
    "ldmlab.data.latents": ["LatentDecoder"],
    "ldmlab.data.module": ["ShardDataModule", "ShardSource", "StreamSettings"],
    "ldmlab.data.folder": ["FolderShards"],
    "ldmlab.data.paired": ["DreamBoothData"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'ldmlab.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
