"""Image transforms on PIL images (no torchvision: its only wheel here is a CUDA build that breaks imports)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image → (3, H, W) float32 tensor in [-1, 1] (the range the VAE and diffusion models expect)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


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
        """Transform one image; `rng` drives the random crop and flip (required when either is on)."""
        if rng is None and (self.random_crop or self.random_flip):
            raise ValueError("ImageTransform with random_crop/random_flip needs an rng")
        img = resize_shorter(img.convert("RGB"), self.size)
        img = random_crop(img, self.size, rng) if rng and self.random_crop else center_crop(img, self.size)
        if rng and self.random_flip:
            img = random_hflip(img, rng)
        return to_tensor(img)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, random_crop={self.random_crop}, random_flip={self.random_flip})"
