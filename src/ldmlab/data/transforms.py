"""Image transforms on PIL images (no torchvision: its only wheel here is a CUDA build that breaks imports)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

_SCALE = np.float32(1 / 127.5)


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


def to_batch(arrays: Sequence[np.ndarray], uint8: bool = False) -> torch.Tensor:
    """[(H, W, 3) uint8 arrays or views] → (B, 3, H, W) float32 in [-1, 1]; with uint8=True the pixels as
    they are, (B, H, W, 3) uint8, for `normalize` to finish on the device.

    The float conversion is done by numpy straight into the batch buffer: torch's uint8→float copy plus
    torch.stack of permuted tensors cost more than the JPEG decode here.
    """
    if uint8:
        return torch.from_numpy(np.stack(arrays))
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), 3, h, w), np.float32)
    for i, arr in enumerate(arrays):
        np.multiply(arr.transpose(2, 0, 1), _SCALE, out=out[i], dtype=np.float32)
    np.subtract(out, np.float32(1.0), out=out)
    return torch.from_numpy(out)


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
        # PIL crops and flips with memcpy-speed copies; numpy views of them would make the batch copy strided
        # (~5x slower, as slow as the decode).
        img = random_crop(img, self.size, rng) if rng and self.random_crop else center_crop(img, self.size)
        if rng and self.random_flip:
            img = random_hflip(img, rng)
        return np.asarray(img)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, random_crop={self.random_crop}, random_flip={self.random_flip})"
