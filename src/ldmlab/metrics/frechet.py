"""Fréchet distance between Gaussians fitted to features (FID when the features are Inception-v3 pool3).

Heusel et al. 2017 ("GANs Trained by a Two Time-Scale Update Rule ...", their FID formula), after Dowson &
Landau 1982: d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).
pytorch-fid takes `scipy.linalg.sqrtm(Σ1 Σ2)` of the non-symmetric product (and retries with εI when it is
singular); torchmetrics takes `eigvals(Σ1 Σ2)`. Here Tr (Σ1 Σ2)^½ = Σᵢ √λᵢ(Σ1^½ Σ2 Σ1^½): the product
Σ1^½ Σ2 Σ1^½ is similar to Σ1 Σ2 (same eigenvalues) but symmetric positive semi-definite, so a symmetric
eigen-solver (`eigh`) gives real, non-negative eigenvalues, with no complex round-off to discard.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _f64(x: ArrayLike) -> Tensor:
    """A float64 tensor of `x` (numpy arrays are accepted as well)."""
    return torch.as_tensor(x).to(torch.float64)


def sqrtm_psd(a: ArrayLike) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix, by eigen-decomposition (float64)."""
    a = _f64(a)
    w, v = torch.linalg.eigh((a + a.T) / 2)  # symmetrise: round-off in a covariance is not part of it
    return (v * w.clamp_min(0).sqrt()) @ v.T  # eigenvalues below 0 are round-off of a PSD matrix


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """Tr (Σ1 Σ2)^½ for PSD Σ1, Σ2, as Σᵢ √λᵢ(Σ1^½ Σ2 Σ1^½) (float64)."""
    root1 = sqrtm_psd(sigma1)
    m = root1 @ _f64(sigma2).to(root1.device) @ root1
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017), in float64."""
    mu1, mu2, sigma1, sigma2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    mu2, sigma2 = mu2.to(mu1.device), sigma2.to(mu1.device)
    mean_term = float((mu1 - mu2).square().sum())
    return mean_term + float(sigma1.trace() + sigma2.trace()) - 2 * trace_sqrt_product(sigma1, sigma2)


def min_samples_fd(dim: int) -> int:
    """The fewest samples whose covariance can be full rank in `dim` features: dim + 1.

    n samples centred on their own mean span at most n − 1 directions, so the unbiased covariance has rank
    ≤ n − 1 and is singular for n ≤ dim: Σ^½ then misses whole directions and FD is not comparable between
    runs (pytorch-fid warns and adds εI). dim + 1 is a floor, not a recommendation: FD is biased upwards by
    roughly 1/n (Chong & Forsyth 2020), so report numbers at one fixed n (10k or 50k for Inception's 2048).
    """
    return dim + 1


def check_sample_count(n: int, dim: int, setting: str = "n", what: str = "samples", where: str = "") -> None:
    """Raise a one-line ValueError when `n` samples are too few for a full-rank covariance in `dim` features.

    `setting` names what the user changes (a config key, or words: "set <words> to N"); `where` prefixes the line.
    """
    need = min_samples_fd(dim)
    if n < need:
        to = f" to {need}" if " " in setting else f"={need}"
        raise ValueError(f"{where + ': ' if where else ''}FD needs at least {need} samples for {dim} features (a "
                         f"covariance of n samples has rank <= n-1) but got {n} {what}: set {setting}{to} or more "
                         f"(10000+ for numbers comparable across runs)")
