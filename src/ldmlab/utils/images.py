"""Image grids without torchvision: tensors in [-1, 1] → uint8 grids → PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
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


def labelled_grid(images: Tensor, row_names: Sequence[str], columns: int, scale: int = 1) -> Image.Image:
    """One row of `columns` images per name (images in row order), upscaled ×scale, names on the left."""
    if len(images) != len(row_names) * columns:
        raise ValueError(f"{len(images)} images do not make {len(row_names)} rows of {columns}")
    grid = make_grid(images, nrow=columns)  # (3, H', W') uint8
    tile = Image.fromarray(grid.permute(1, 2, 0).numpy())
    tile = tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)
    margin = 8 + 6 * max(len(n) for n in row_names)  # PIL's default bitmap font: ~6 px per character
    canvas = Image.new("RGB", (tile.width + margin, tile.height), "white")
    canvas.paste(tile, (margin, 0))
    draw, row_h = ImageDraw.Draw(canvas), tile.height / len(row_names)
    for i, name in enumerate(row_names):
        draw.text((4, int((i + 0.5) * row_h) - 5), name, fill="black")
    return canvas
