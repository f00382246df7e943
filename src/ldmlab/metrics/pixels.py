"""Pixel-fidelity metrics of a sample against its ground truth (super-resolution, inpainting)."""

from __future__ import annotations

import torch
from torch import Tensor


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR = 10·log10(R² / MSE) in dB of (N, C, H, W) images (R = 2 for [-1, 1] pixels, so [0, 1]
    images with R = 1 give the same numbers), float64, shape (N,); +inf where an image is exact. Average it over
    images for the per-image mean SR papers report (SR3, Saharia et al. 2021, table 1)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.double() - y.double().to(x.device)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)
