"""WebDataset pipelines, transforms, demo data and DataModules."""

from ldmlab.data.demo import DemoSpec, build_demo_shards, class_names, load_photo
from ldmlab.data.transforms import (
    ImageTransform,
    center_crop,
    random_crop,
    random_hflip,
    resize_shorter,
    to_tensor,
)
from ldmlab.data.wds import DemoDataModule, ShardStream, WebDatasetDataModule, count_samples, expand_urls

__all__ = [
    "DemoDataModule",
    "DemoSpec",
    "ImageTransform",
    "ShardStream",
    "WebDatasetDataModule",
    "build_demo_shards",
    "center_crop",
    "class_names",
    "count_samples",
    "expand_urls",
    "load_photo",
    "random_crop",
    "random_hflip",
    "resize_shorter",
    "to_tensor",
]
