"""Image transforms on PIL images and batching to tensors (no torchvision: its only wheel here is a CUDA build
that breaks imports). Per-image work stays in PIL/numpy copies at memcpy speed; see `rgb_bytes`, `to_batch`."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from ldmlab.data.buckets import cover_box

_SCALE = np.float32(1 / 127.5)
_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32}


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side equals `size`, keeping the aspect ratio (bicubic, antialiased)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    # max(size, ...) guards against rounding the shorter side below `size` for extreme aspect ratios.
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    # PIL widens the filter support when downsampling, so this antialiases like torchvision's resize.
    return img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central `size`×`size` square."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Crop a `size`×`size` square at a position drawn from `rng`."""
    w, h = img.size
    left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    return img.crop((left, top, left + size, top + size))


def random_hflip(img: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability `p`."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


def rgb_bytes(img: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    """The RGB bytes of `box` of an RGB image: crop and export in one pass.

    Same bytes as img.crop(box).tobytes() at ~1/6 of the time here: tobytes() encodes in 64 KiB chunks and
    joins them, a crop copies first; together they cost a third of decoding a 256 px JPEG.
    """
    try:
        encoder = Image._getencoder("RGB", "raw", "RGB")  # what tobytes() uses, on a region, in one chunk
        encoder.setimage(img.im, box)
        _, status, data = encoder.encode((box[2] - box[0]) * (box[3] - box[1]) * 3)
        if status == 1:
            return data
    except AttributeError:  # a Pillow without these internals
        pass
    return img.crop(box).tobytes()


def batch_buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker it lives in shared memory, so handing the batch to the
    main process costs no copy (what torch's default_collate does)."""
    if get_worker_info() is None:  # numpy's allocator: torch.empty measured ~20 % slower for these batches
        return torch.from_numpy(np.empty(tuple(shape), _NUMPY_DTYPES[dtype]))
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(tuple(shape))


def to_batch(arrays: Sequence[np.ndarray], uint8: bool = False) -> torch.Tensor:
    """[(H, W, 3) uint8 arrays] → (B, 3, H, W) float32 in [-1, 1]; with uint8=True the pixels as they are,
    (B, H, W, 3) uint8, for `normalize` to finish on the device.

    The float conversion is done by numpy straight into the batch buffer: torch's uint8→float copy plus
    torch.stack of permuted tensors cost more than the JPEG decode here.
    """
    h, w = arrays[0].shape[:2]
    if uint8:
        out = batch_buffer((len(arrays), h, w, 3), torch.uint8)
        np.stack(arrays, out=out.numpy())
        return out
    out = batch_buffer((len(arrays), 3, h, w), torch.float32)
    buf = out.numpy()
    for i, arr in enumerate(arrays):
        np.multiply(arr.transpose(2, 0, 1), _SCALE, out=buf[i], dtype=np.float32)
    np.subtract(buf, np.float32(1.0), out=buf)
    return out


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [-1, 1], the same numbers as `to_batch`, on its device."""
    return pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).mul_(
        float(_SCALE)).sub_(1.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image → (3, H, W) float32 tensor in [-1, 1] (what the VAE and diffusion models expect)."""
    return to_batch([np.asarray(img.convert("RGB"))])[0]


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] → RGB PIL image (inverse of `to_tensor`, up to rounding)."""
    arr = x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


def cover_crop(img: Image.Image, size: tuple[int, int], rng: random.Random | None, random_crop: bool = False,
               random_flip: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to cover `size` = (H, W) keeping the aspect ratio, crop H×W (centre or random), maybe flip:
    ((H, W, 3) uint8, (top, left) of the crop in the resized image), the offsets SDXL §2.2 conditions on."""
    (H, W), (w, h) = size, img.size
    img = img.convert("RGB") if img.mode != "RGB" else img
    rh, rw = cover_box(h, w, H, W)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = (rng.randint(0, rh - H), rng.randint(0, rw - W)) if rng and random_crop else \
        ((rh - H) // 2, (rw - W) // 2)
    if rng and random_flip and rng.random() < 0.5:
        img, left = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rw - left - W
    pixels = np.frombuffer(rgb_bytes(img, (left, top, left + W, top + H)), np.uint8).reshape(H, W, 3)
    return pixels, (top, left)


class ImageTransform:
    """Resize the shorter side to `size`, crop a square (centre or random), maybe flip, map to [-1, 1]."""

    def __init__(self, size: int, random_crop: bool = False, random_flip: bool = False) -> None:
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = size
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Transform one image to a (3, S, S) tensor in [-1, 1]; `rng` drives the random crop and flip."""
        return to_batch([self.pixels(img, rng)])[0]

    def pixels(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """Resize, crop and flip one image to (S, S, 3) uint8."""
        if rng is None and (self.random_crop or self.random_flip):
            raise ValueError("ImageTransform with random_crop/random_flip needs an rng")
        img = resize_shorter(img.convert("RGB") if img.mode != "RGB" else img, self.size)
        (w, h), s = img.size, self.size
        # Same draws, in the same order, as random_crop() then random_hflip().
        left, top = (rng.randint(0, w - s), rng.randint(0, h - s)) if rng and self.random_crop else \
            ((w - s) // 2, (h - s) // 2)
        if rng and self.random_flip and rng.random() < 0.5:
            # PIL mirrors at memcpy speed; a mirrored numpy view would make the batch copy ~10x slower.
            img, left = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), w - left - s
        return np.frombuffer(rgb_bytes(img, (left, top, left + s, top + s)), np.uint8).reshape(s, s, 3)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, random_crop={self.random_crop}, "
                f"random_flip={self.random_flip})")
