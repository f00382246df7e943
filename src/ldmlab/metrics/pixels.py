"""Pixel-fidelity metrics of a sample against its ground truth (super-resolution, inpainting): per-image PSNR and
SSIM, and their mean over the images of every rank (`PixelFidelity`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmlab.metrics.distributed import all_reduce_sum

PIXEL_METRICS = ("psnr", "ssim")


def _check_pair(name: str, x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{name} needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Per-image PSNR = 10·log10(R² / MSE) in dB of (N, C, H, W) images (R = 2 for [-1, 1] pixels, so [0, 1]
    images with R = 1 give the same numbers), float64, shape (N,); +inf where an image is exact. Average it over
    images for the per-image mean SR papers report (SR3, Saharia et al. 2021, table 1)."""
    _check_pair("psnr", x, y)
    mse = (x.double() - y.double().to(x.device)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The normalised (size, size) Gaussian of SSIM's local statistics (Wang et al. 2004, sec. III-C), float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, value_range: tuple[float, float] = (-1.0, 1.0), window: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004, eq. 13: K1 = 0.01, K2 = 0.03, an 11×11 Gaussian window of σ = 1.5) of
    (N, C, H, W) images whose pixels span `value_range`, float64, shape (N,): the mean of the SSIM map over every
    channel and every position where the window fits (skimage's `structural_similarity(gaussian_weights=True)`).

    SSIM's luminance term is not shift-invariant: it is defined on intensities in [0, L], so [-1, 1] pixels are
    shifted to [0, 2] first (the same numbers as [0, 1] or [0, 255] images of the same picture)."""
    _check_pair("ssim", x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window} px a side (its window), got {tuple(x.shape[-2:])}")
    low, high = value_range
    c = x.shape[1]
    kernel = gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)
    x, y = x.double() - low, y.double().to(x.device) - low

    def local_mean(t: Tensor) -> Tensor:  # (N, C, H - w + 1, W - w + 1): one Gaussian-weighted mean per window
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x**2, local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * (high - low)) ** 2, (0.03 * (high - low)) ** 2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


class PixelFidelity:
    """Per-image PSNR and SSIM of images against their ground truth, summed on each rank; `compute()` (a
    collective under torch.distributed) gives their means over the images of every rank."""

    def __init__(self, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        self.value_range = value_range
        self.sums = torch.zeros(3, dtype=torch.float64)  # Σ psnr, Σ ssim, images

    def update(self, images: Tensor, truth: Tensor) -> None:
        """Add one batch: (N, C, H, W) images and their ground truth."""
        low, high = self.value_range
        scores = psnr(images, truth, high - low).sum(), ssim(images, truth, self.value_range).sum()
        self.sums += torch.tensor([*(float(s) for s in scores), len(images)], dtype=torch.float64)

    def compute(self) -> dict[str, float]:
        """{"psnr": mean dB, "ssim": mean} over all images seen by all ranks."""
        total_psnr, total_ssim, count = all_reduce_sum(self.sums).tolist()
        if count == 0:
            raise ValueError("PixelFidelity.compute: no images were scored")
        return {"psnr": total_psnr / count, "ssim": total_ssim / count}
