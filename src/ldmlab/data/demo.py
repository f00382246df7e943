"""Embedded demo data: crops of real photographs that ship inside scikit-image and scikit-learn.

Each source photograph is one class. Train crops come from the left part of a photo and validation crops
from a vertical strip on its right (the rightmost `val_fraction` of the width), so no validation crop shares
a pixel with any train crop. Crops are written once as WebDataset shards:

    <root>/demo/<c{crop}-n{crops}-v{val}-s{seed}-{hash}>/
        train-000000.tar ...   {key}.png (RGB crop), {key}.cls (label), {key}.json (source, box, split)
        val-000000.tar ...
        classes.json           class names in label order
        manifest.json          parameters, per-split sample counts, per-shard counts ("counts")
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ldmlab.data.shards import build_once

FORMAT_VERSION = 1  # bump when the crop or shard layout changes, so old directories are not reused


def _skimage(name: str) -> Callable[[], np.ndarray]:
    """Loader for a photo bundled with scikit-image."""

    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    """Loader for one of scikit-learn's `load_sample_images()` photos."""

    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        images = load_sample_images()
        return images.images[[Path(f).name for f in images.filenames].index(filename)]

    return load


def _motorcycle() -> np.ndarray:
    """Left view of scikit-image's Middlebury stereo pair."""
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _retina() -> np.ndarray:
    """The inscribed square of the fundus disc: the corners outside it are black and would be unlabelable."""
    import skimage.data

    return skimage.data.retina()[215:1195, 215:1195]


# Label order is this order. Checked to load offline; excluded: eagle, lily, brain, cells3d, kidney, skin,
# human_mitosis, palisades_of_vogt, ... (need a network download), cat (== chelsea), and synthetic images
# (checkerboard, colorwheel, logo, binary_blobs, horse, shepp_logan_phantom).
COLOR_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),  # 512×512
    "chelsea": _skimage("chelsea"),  # 300×451, a cat
    "coffee": _skimage("coffee"),  # 400×600
    "rocket": _skimage("rocket"),  # 427×640
    "hubble_deep_field": _skimage("hubble_deep_field"),  # 872×1000
    "retina": _retina,  # 980×980 (inscribed square of 1411×1411)
    "immunohistochemistry": _skimage("immunohistochemistry"),  # 512×512
    "motorcycle": _motorcycle,  # 500×741
    "china": _sklearn("china.jpg"),  # 427×640
    "flower": _sklearn("flower.jpg"),  # 427×640
}
# Grayscale photographs (opt-in with grayscale=True), replicated to 3 channels; labels follow the colour ones.
GRAY_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    name: _skimage(name)
    for name in ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell", "page", "text")
}


def class_names(grayscale: bool = False) -> list[str]:
    """Demo class names in label order."""
    return list(COLOR_PHOTOS) + (list(GRAY_PHOTOS) if grayscale else [])


def load_photo(name: str) -> np.ndarray:
    """A source photograph as an (H, W, 3) uint8 array."""
    photo = {**COLOR_PHOTOS, **GRAY_PHOTOS}[name]()
    return np.repeat(photo[..., None], 3, axis=-1) if photo.ndim == 2 else np.ascontiguousarray(photo)


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines the demo shards' bytes."""

    crop_size: int = 32
    crops_per_image: int = 500
    val_crops_per_image: int = 50
    seed: int = 0
    scale: tuple[float, float] | None = None  # crop side as a fraction of the photo's shorter side; None = 1:1
    val_fraction: float = 0.2  # width of the held-out strip on the right of each photo
    grayscale: bool = False
    shard_size: int = 500
    aspect: float | None = None  # crops of width/height drawn log-uniformly in [1/aspect, aspect]; None = squares

    def dirname(self) -> str:
        """Readable name of the main parameters plus a hash of all of them (square specs: as before `aspect`)."""
        fields = {**asdict(self), "scale": list(self.scale) if self.scale else None, "v": FORMAT_VERSION}
        if self.aspect is None:
            del fields["aspect"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"c{self.crop_size}-n{self.crops_per_image}-v{self.val_crops_per_image}-s{self.seed}-{digest}"

    def num_shards(self, split: str) -> int:
        """How many shards `split` is written to (known before building, so urls can be formed early)."""
        per_image = self.crops_per_image if split == "train" else self.val_crops_per_image
        return math.ceil(len(class_names(self.grayscale)) * per_image / self.shard_size)


def as_scale(scale: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate a (low, high) crop-side fraction range; None stays None (unscaled crops)."""
    if scale is None:
        return None
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
    return lo, hi


def split_bounds(width: int, val_fraction: float) -> tuple[int, int]:
    """[x0, x1) column range of the train region and of the validation strip: train is [0, s), val [s, W)."""
    strip = max(1, round(width * val_fraction))
    return width - strip, width


def crop_shape(box: Sequence[int], spec: DemoSpec) -> tuple[int, int]:
    """(H, W) a crop is stored at: crop_size² for square crops; unscaled crops at the box's own pixels; scaled
    ones at about crop_size² pixels at the box's ratio."""
    crop_size = spec.crop_size
    if spec.aspect is None:
        return crop_size, crop_size
    if spec.scale is None:
        return box[3] - box[1], box[2] - box[0]
    ratio = (box[2] - box[0]) / (box[3] - box[1])  # W/H
    return max(1, round(crop_size / math.sqrt(ratio))), max(1, round(crop_size * math.sqrt(ratio)))


def crop_boxes(shape: tuple[int, ...], n: int, split: str, spec: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """(n, 4) boxes [x0, y0, x1, y1] inside the split's region of a photo of `shape`."""
    h, w = shape[:2]
    s, _ = split_bounds(w, spec.val_fraction)
    lo, hi = (0, s) if split == "train" else (s, w)
    # The largest side fits the val strip, for train too, so both splits see the same scale distribution.
    max_side = min(h, w - s)
    if spec.scale is None:
        sides = np.full(n, spec.crop_size)
    else:
        sides = np.clip(np.round(rng.uniform(*spec.scale, size=n) * min(h, w)), 1, max_side).astype(int)
    ratios = np.ones(n) if spec.aspect is None else np.exp(rng.uniform(-1, 1, size=n) * math.log(spec.aspect))
    widths = np.round(sides * np.sqrt(ratios)).astype(int)  # about sides² pixels at ratio W/H
    heights = np.round(sides / np.sqrt(ratios)).astype(int)
    if widths.max(initial=0) > max_side or heights.max(initial=0) > h:
        raise ValueError(f"crop_size {spec.crop_size} (aspect {spec.aspect}) exceeds a validation strip of "
                         f"{max_side} px; lower crop_size or raise val_fraction")
    x0 = lo + (rng.random(n) * (hi - lo - widths + 1)).astype(int)
    y0 = (rng.random(n) * (h - heights + 1)).astype(int)
    return np.stack([x0, y0, x0 + widths, y0 + heights], axis=1)


def cut_crop(photo: np.ndarray, box: Sequence[int], size: int | tuple[int, int]) -> np.ndarray:
    """The pixels under `box`, resized (bicubic) to `size` = (H, W) (an int: a square) when the box differs."""
    size = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = photo[y0:y1, x0:x1]
    if patch.shape[:2] == tuple(size):
        return patch
    return np.asarray(Image.fromarray(patch).resize((size[1], size[0]), Image.Resampling.BICUBIC))


def _png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB array (PIL writes no timestamp, so equal pixels give equal bytes)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _split_samples(split: str, spec: DemoSpec, photos: list[np.ndarray]) -> list[dict]:
    """All samples of one split as wds dicts: train in a seeded random order, val round-robin over classes."""
    per_image = spec.crops_per_image if split == "train" else spec.val_crops_per_image
    split_id = 0 if split == "train" else 1
    samples = []
    for label, (name, photo) in enumerate(zip(class_names(spec.grayscale), photos)):
        rng = np.random.default_rng([spec.seed, split_id, label])  # independent stream per class and split
        for i, box in enumerate(crop_boxes(photo.shape, per_image, split, spec, rng)):
            meta = {"source": name, "label": label, "box": [int(v) for v in box], "split": split}
            pixels = cut_crop(photo, box, crop_shape(box, spec))
            samples.append({"__key__": f"{name}-{split}-{i:06d}", "png": _png(pixels),
                            "cls": str(label).encode(), "json": json.dumps(meta, sort_keys=True).encode()})
    if split == "train":
        order = np.random.default_rng([spec.seed, 2]).permutation(len(samples)).tolist()
    else:  # round-robin over classes (sample j is crop j % per_image of class j // per_image): mixed val batches
        order = sorted(range(len(samples)), key=lambda j: (j % per_image, j // per_image))
    return [samples[j] for j in order]


def _write_shards(out: Path, split: str, samples: list[dict], shard_size: int) -> dict[str, int]:
    """Write `samples` as `{split}-%06d.tar`; returns {shard file name: sample count}."""
    counts: dict[str, int] = {}
    for k in range(0, len(samples), shard_size):
        name = f"{split}-{k // shard_size:06d}.tar"
        # Fixed mtime/owner make the tar bytes a function of the samples only (byte-identical rebuilds).
        with wds.TarWriter(str(out / name), encoder=False, mtime=0.0, user="ldmlab", group="ldmlab") as sink:
            for sample in samples[k:k + shard_size]:
                sink.write(sample)
        counts[name] = len(samples[k:k + shard_size])
    return counts


def build_demo_shards(
    root: str | os.PathLike,
    crop_size: int = 32,
    crops_per_image: int = 500,
    val_crops_per_image: int = 50,
    seed: int = 0,
    shard_size: int = 500,
    scale: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    grayscale: bool = False,
    spec: DemoSpec | None = None,
    aspect: float | None = None,
) -> Path:
    """Write the demo shards under `<root>/demo/<name>/` once and return that directory (reused if present).

    `spec`, when given, replaces the other parameters.
    """
    spec = spec or DemoSpec(crop_size, crops_per_image, val_crops_per_image, seed, as_scale(scale),
                            val_fraction, grayscale, shard_size, aspect)
    return build_once(Path(root) / "demo" / spec.dirname(), lambda out: _build_into(out, spec))


def _build_into(out: Path, spec: DemoSpec) -> None:
    """Write shards, classes.json and manifest.json of `spec` into `out`."""
    names = class_names(spec.grayscale)
    photos = [load_photo(n) for n in names]
    counts, splits = {}, {}
    for split in ("train", "val"):
        split_counts = _write_shards(out, split, _split_samples(split, spec, photos), spec.shard_size)
        counts.update(split_counts)
        splits[split] = {"samples": sum(split_counts.values()), "shards": len(split_counts)}
    (out / "classes.json").write_text(json.dumps(names, indent=1) + "\n")
    manifest = {
        "format": FORMAT_VERSION,
        "spec": {**asdict(spec), "scale": list(spec.scale) if spec.scale else None},
        "classes": [{"name": n, "label": i, "height": p.shape[0], "width": p.shape[1],
                     "val_x0": split_bounds(p.shape[1], spec.val_fraction)[0]}
                    for i, (n, p) in enumerate(zip(names, photos))],
        "splits": splits,
        "counts": counts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")  # written last: marks "complete"


class DemoShards:
    """`data=demo`'s shard source: the crops of `DemoSpec`, built once under `<data_dir>/demo/<spec name>/`."""

    def __init__(self, data_dir: str = "data", crop_size: int = 32, crops_per_image: int = 500,
                 val_crops_per_image: int = 50, seed: int = 0, scale: Sequence[float] | None = None,
                 grayscale: bool = False, shard_size: int = 500, aspect: float | None = None) -> None:
        self.data_dir = data_dir
        if aspect is not None and aspect < 1:
            raise ValueError(f"data.source.aspect={aspect} must be >= 1 (the largest W/H or H/W), or null for squares")
        self.spec = DemoSpec(crop_size, crops_per_image, val_crops_per_image, seed, as_scale(scale),
                             grayscale=grayscale, shard_size=shard_size, aspect=aspect)

    @property
    def root(self) -> str:
        """The directory the shards, classes.json and manifest.json are (or will be) in."""
        return str(Path(self.data_dir) / "demo" / self.spec.dirname())

    def prepare(self) -> None:
        """Build the shards unless they exist (atomic: concurrent builders keep the first one's result)."""
        build_demo_shards(self.data_dir, spec=self.spec)
