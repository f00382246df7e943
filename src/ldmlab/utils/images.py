"""Image grids without torchvision: tensors in [-1, 1] → uint8 grids → PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) in [-1, 1] → uint8 in [0, 255], same shape."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: Tensor, nrow: int = 8, padding: int = 2) -> Tensor:
    """Tile (N, C, H, W) images in [-1, 1] into one (C, H', W') uint8 grid, `nrow` images per row."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255, dtype=torch.uint8)
    for i, img in enumerate(to_uint8(images.cpu())):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = img
    return grid


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) uint8 tensor (C = 1 or 3) as a PNG, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else np.ascontiguousarray(array)).save(path)
    return path
