"""Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around feature vectors as manifolds.

Each real feature gets a ball whose radius is the distance to its k-th nearest other real feature; the union of
the balls estimates the real manifold. Precision = the share of generated features inside it; recall = the share
of real features inside the generated manifold built the same way (paper Sec. 2). Distances are taken
in row blocks, so 10k × 10k features never hold a full distance matrix (a block is `block` × N floats).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (len(a), len(b)) through one matmul (as NVlabs' implementation), ≥ 0."""
    d = a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)
    return d.clamp_min(0)


def knn_radii(features: Tensor, k: int = 3, block: int = 1024) -> Tensor:
    """Squared distance from each row to its k-th nearest other row (N,) (the ball radii, squared)."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature rows, got {features.shape[0]}")
    # k + 1: every row is its own nearest neighbour at distance 0 (NVlabs stylegan2-ada does the same).
    return torch.cat([_sq_dists(features[i:i + block], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, features.shape[0], block)])


def manifold_coverage(manifold: Tensor, radii: Tensor, queries: Tensor, block: int = 1024) -> float:
    """Share of `queries` rows within the radius of at least one `manifold` row (radii squared, (N,))."""
    inside = [(_sq_dists(queries[i:i + block], manifold) <= radii).any(dim=1)
              for i in range(0, queries.shape[0], block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features: Tensor, fake_features: Tensor, k: int = 3,
                     block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of generated vs real features (Kynkäänniemi et al. 2019), k-NN balls.

    float32 unless a side is float64 (the matmul distances round near a ball's edge; float64 to be exact).
    """
    dtype = torch.float64 if torch.float64 in (real_features.dtype, fake_features.dtype) else torch.float32
    real = real_features.to(dtype)
    fake = fake_features.to(real.device, dtype)
    precision = manifold_coverage(real, knn_radii(real, k, block), fake, block)
    recall = manifold_coverage(fake, knn_radii(fake, k, block), real, block)
    return precision, recall
