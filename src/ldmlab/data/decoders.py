"""Raw WebDataset samples → batch items: image decoding and the `cls`/`txt`/`json` → label/text mapping.

A decoder is called on each raw sample (a dict of bytes from the tar) with the worker's rng and returns an
item, or raises `BadSample` (skipped and counted by the stream); `collate` turns a list of items into the
batch dict. The latent decoder lives in `ldmlab.data.latents`.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from PIL import Image

from ldmlab.data.buckets import OUTSIDE, SMALL, assign, parse_buckets
from ldmlab.data.filters import BadSample
from ldmlab.data.transforms import ImageTransform, cover_crop, normalize, to_batch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BATCH_FIELDS = ("label", "text")  # what data.decoder.required may list


class Decoder(Protocol):
    """Turns raw samples into items and items into a batch; the DataModule's injected part (conf/data/*.yaml).

    The configured decoder is a template: `for_stream` gives the one a stream runs (augmenting or not, and with
    what the shards' manifest says); `on_device` finishes a batch after its host→device transfer, the part of
    decoding that is cheaper there (the DataModule's `on_after_batch_transfer` calls it).
    """

    def __call__(self, sample: dict, rng: random.Random, bucket: int | None = None) -> Any: ...

    def collate(self, items: list, rng: random.Random) -> dict: ...

    def for_stream(self, train: bool, on_device: bool = False, manifest: dict | None = None) -> Decoder: ...

    def on_device(self, batch: dict) -> dict: ...

    # aspect-ratio buckets (ldmlab.data.buckets): None → one shape, and the stream batches in arrival order
    @property
    def bucket_sizes(self) -> list | None: ...

    reshapes: bool  # whether __call__(sample, rng, bucket) can put a sample into another bucket than its own
    bucket_weights: list | None  # samples per bucket when known (a latent cache's manifest), else None

    def bucket_of(self, sample: dict) -> tuple[int, str | None]: ...

    def with_buckets(self, sizes: Sequence[tuple[int, int]] | None) -> Decoder: ...


def where(sample: dict) -> str:
    """`sample 'key' in shard 'url'`, for error messages."""
    return f"sample {sample.get('__key__')!r} in shard {sample.get('__url__')!r}"


def _json(sample: dict) -> dict:
    """The sample's parsed .json (parsed once), or {} when it has none."""
    if "__json__" not in sample:
        try:
            sample["__json__"] = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as e:
            raise BadSample("undecodable", f"{where(sample)}: .json does not parse ({e})") from None
    return sample["__json__"]


def get_field(sample: dict, spec: str) -> Any:
    """A field ("cls", "txt") or a key of the sample's json ("json:caption"); None when absent."""
    if spec.startswith("json:"):
        return _json(sample).get(spec[5:])
    return sample.get(spec)


class Fields:
    """Label and caption of a sample from configurable fields; missing ones are -1 / "" unless required."""

    def __init__(self, label_key: str | None = "cls", text_key: str | None = "txt",
                 required: Sequence[str] = ()) -> None:
        unknown = set(required) - set(BATCH_FIELDS)
        if unknown:
            raise ValueError(f"data.decoder.required lists {sorted(unknown)}: it may only list {list(BATCH_FIELDS)}")
        for name in required:
            if {"label": label_key, "text": text_key}[name] is None:
                raise ValueError(f"data.decoder.required lists {name!r} but data.decoder.{name}_key is null: set the field")
        self.label_key, self.text_key, self.required = label_key, text_key, set(required)

    def __call__(self, sample: dict) -> tuple[int, str]:
        """(label or -1, text or "") of a raw sample; BadSample when a required one is missing or invalid."""
        label = self._get(sample, "label", self.label_key)
        text = self._get(sample, "text", self.text_key)
        try:
            label = -1 if label is None else int(label)
        except (TypeError, ValueError):
            raise BadSample("undecodable", f"{where(sample)}: label field {self.label_key!r} = {label!r} "
                                           f"is not an integer") from None
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return label, "" if text is None else str(text).strip()

    def _get(self, sample: dict, name: str, key: str | None) -> Any:
        """The value behind batch field `name`; BadSample naming key and shard when required and absent."""
        value = get_field(sample, key) if key else None
        if value is None and name in self.required:
            raise BadSample("missing", f"{where(sample)} has no {key!r} field (data.decoder.{name}_key={key!r}, "
                                       f"required by data.decoder.required): fix the shards or drop {name!r} from it")
        return value


def open_image(sample: dict) -> Image.Image:
    """The sample's image decoded to RGB; BadSample when absent or undecodable."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample("missing", f"{where(sample)} has no image (expected one of "
                                   f".{'/.'.join(IMAGE_EXTS)}, found {found})")
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        # convert() to the same mode would copy; load() decodes in place and surfaces truncation errors
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadSample("undecodable",
                        f"{where(sample)}: .{ext} does not decode ({type(e).__name__}: {e})") from None
    return image


def image_header(sample: dict) -> tuple[int, int]:
    """(H, W) of the sample's image from its header alone (no pixel decoding); BadSample when unreadable."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        open_image(sample)  # raises the one-line "has no image"
    try:
        w, h = Image.open(io.BytesIO(sample[ext])).size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadSample("undecodable", f"{where(sample)}: .{ext} does not decode ({type(e).__name__}: {e})") from None
    return h, w


@dataclass
class ImageDecoder:
    """Raw sample → (pixels (S, S, 3) uint8, label, text, key); collate makes (B, 3, S, S) in [-1, 1].

    `uint8=True` (set by `for_stream(on_device=True)`, i.e. under a Trainer): batches keep the pixels as uint8
    (B, S, S, 3) and `on_device` maps them to float there. The float conversion costs as much as the JPEG decode
    on a CPU core, and uint8 crosses the process and host→device boundaries at a quarter of the bytes.

    With `buckets` (`ldmlab.data.buckets`), an image is resized to cover its bucket's (H, W) instead of
    the S×S square, items also carry the original (H, W) and the crop's (top, left), and batches
    `original_size` and `crop_top_left` ((B, 2) int64, SDXL §2.2's micro-conditioning names).
    """

    image_size: int = 256
    random_crop: bool = False
    random_flip: bool = True
    label_key: str | None = "cls"  # label field: "cls", or "json:<key>"; missing → -1
    text_key: str | None = "txt"  # caption field: "txt", or "json:<key>"; missing → ""
    required: Sequence[str] = ()  # "label" and/or "text": samples without them are bad
    min_image_size: int = 1  # images with a shorter side below this are bad
    buckets: Any = None  # null: S×S squares; a list of [H, W]; or {area, step, max_ratio}
    small_images: str = "upscale"  # smaller than their bucket: upscale | skip (both counted)
    outside_ratio: str = "nearest"  # aspect ratio beyond the buckets': nearest | skip (both counted)
    uint8: bool = field(default=False, init=False)  # set by for_stream: not a config key

    def __post_init__(self) -> None:
        self.fields = Fields(self.label_key, self.text_key, list(self.required))
        self.transform = ImageTransform(self.image_size, self.random_crop, self.random_flip)
        self.min_image_size = max(1, self.min_image_size)
        for key, valid in (("small_images", SMALL), ("outside_ratio", OUTSIDE)):
            if getattr(self, key) not in valid:
                raise ValueError(f"data.decoder.{key}={getattr(self, key)!r} is unknown: valid are {list(valid)}")
        self.sizes = parse_buckets(self.buckets)

    @property
    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """The buckets' (H, W), or None: one square size."""
        return self.sizes

    reshapes = True  # a sample can be resized into any bucket (a BucketBatcher may borrow)
    bucket_weights = None  # unknown up front: the DataModule counts a probe of the shards

    def with_buckets(self, sizes: Sequence[tuple[int, int]] | None) -> ImageDecoder:
        """This decoder restricted to `sizes` (the buckets the data uses); None: image_size² squares."""
        stream = replace(self, buckets=None if sizes is None else [list(s) for s in sizes])
        stream.uint8 = self.uint8
        return stream

    def for_stream(self, train: bool, on_device: bool = False, manifest: dict | None = None) -> ImageDecoder:
        """This decoder for training (random crop/flip as configured) or validation (centre crop, no flip)."""
        stream = replace(self, random_crop=self.random_crop and train, random_flip=self.random_flip and train)
        stream.uint8 = on_device
        return stream

    def _checked(self, sample: dict, h: int, w: int) -> None:
        if min(h, w) < self.min_image_size:
            raise BadSample("shape", f"{where(sample)}: image is {w}×{h}, shorter side "
                                     f"below data.decoder.min_image_size={self.min_image_size}")

    def bucket_of(self, sample: dict) -> tuple[int, str | None]:
        """(bucket, note) of a raw sample from its header and fields only; BadSample when it is unusable."""
        h, w = image_header(sample)
        self._checked(sample, h, w)
        self.fields(sample)
        return assign(self.sizes, h, w, self.small_images, self.outside_ratio, where(sample))

    def __call__(self, sample: dict, rng: random.Random | None, bucket: int | None = None) -> tuple:
        """(pixels (S, S, 3) uint8, label, text, key) of a raw sample, with buckets (pixels (H, W, 3) of
        `bucket`, default its own, ..., original (H, W), crop (top, left)); BadSample when it is unusable."""
        image = open_image(sample)
        self._checked(sample, image.size[1], image.size[0])
        label, text = self.fields(sample)
        if self.sizes is None:
            return self.transform.pixels(image, rng), label, text, sample["__key__"]
        w, h = image.size
        if bucket is None:
            bucket, _ = assign(self.sizes, h, w, self.small_images, self.outside_ratio, where(sample))
        pixels, crop = cover_crop(image, self.sizes[bucket], rng, self.random_crop, self.random_flip)
        return pixels, label, text, sample["__key__"], (h, w), crop

    def collate(self, items: list, rng: random.Random | None = None) -> dict:
        """Items → {"image": (B,3,H,W) float32 in [-1, 1] (or uint8), "label": (B,) int64, "text", "key"}
        (+ "original_size", "crop_top_left" (B, 2) int64 with buckets)."""
        images, labels, texts, keys, *sizes = zip(*items)
        batch = {"image": to_batch(images, self.uint8), "label": torch.tensor(labels, dtype=torch.int64),
                 "text": list(texts), "key": list(keys)}
        if sizes:
            batch["original_size"] = torch.tensor(sizes[0], dtype=torch.int64)
            batch["crop_top_left"] = torch.tensor(sizes[1], dtype=torch.int64)
        return batch

    def on_device(self, batch: dict) -> dict:
        """uint8 pixels → float32 in [-1, 1] (the same numbers `collate` makes on the host)."""
        if batch["image"].dtype == torch.uint8:
            batch["image"] = normalize(batch["image"])
        return batch
