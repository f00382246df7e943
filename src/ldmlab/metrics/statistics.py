"""Running feature statistics (Σx, Σxxᵀ, n in float64) with the metadata that says what made them.

Sums, not means, are the state: they add exactly across batches and across DDP ranks whatever the count on each
rank, and mean and covariance come out at the end. Each product of two float32 features is exact in float64
(24 + 24 < 53 mantissa bits), so only the additions round. The metadata (feature network, image resolution,
data source) travels in the saved file so that reference statistics made another way are refused in one line
before any sampling (`check_compatible`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldmlab.metrics.distributed import all_reduce_sum

FORMAT = "ldmlab.feature_statistics.v1"


@dataclass(frozen=True)
class StatsKey:
    """What must agree between reference and generated statistics: feature network, its width, resolution."""

    network: str
    num_features: int
    resolution: int | None = None  # image side in pixels; None = not known (not checked)

    def describe(self) -> str:
        """e.g. 'inception-v3-fid (2048 features) at 256 px'."""
        at = f" at {self.resolution} px" if self.resolution is not None else ""
        return f"{self.network} ({self.num_features} features){at}"


class FeatureStatistics:
    """Running float64 Σx (D,), Σxxᵀ (D, D) and count of feature rows, plus network/resolution/source metadata."""

    def __init__(self, num_features: int, network: str, resolution: int | None = None, source: str = "",
                 device: torch.device | str = "cpu") -> None:
        self.network, self.resolution, self.source = network, resolution, source
        self.sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
        self.count = 0
        self.origin: str | None = None  # the file these were loaded from, named in error messages

    @property
    def num_features(self) -> int:
        """D, the feature width."""
        return self.sum.shape[0]

    @property
    def key(self) -> StatsKey:
        """The network, width and resolution these statistics were made with."""
        return StatsKey(self.network, self.num_features, self.resolution)

    def update(self, features: Tensor) -> None:
        """Add a batch of feature rows (B, D); the sums live where the features do (moved there while empty)."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"FeatureStatistics({self.network}): expected features of shape (B, "
                             f"{self.num_features}), got {tuple(features.shape)}")
        if self.count == 0 and self.sum.device != features.device:
            self.to(features.device)
        f = features.detach().to(self.sum.device, torch.float64)
        with torch.autocast(f.device.type, enabled=False):  # the sums stay float64 inside a caller's autocast
            self.sum += f.sum(0)
            self.outer += f.T @ f
        self.count += f.shape[0]

    def to(self, device: torch.device | str) -> FeatureStatistics:
        """Move the sums to `device` (in place); returns self."""
        self.sum, self.outer = self.sum.to(device), self.outer.to(device)
        return self

    def all_reduce(self) -> FeatureStatistics:
        """New statistics summed over all torch.distributed ranks (a copy without it); self is unchanged.

        A collective: every rank calls it. Returning a copy keeps a second call from counting twice.
        """
        out = self._like()
        out.sum, out.outer = all_reduce_sum(self.sum), all_reduce_sum(self.outer)
        out.count = int(all_reduce_sum(torch.tensor(self.count, dtype=torch.long)).item())
        return out

    @property
    def mean(self) -> Tensor:
        """μ = Σx / n (float64, (D,))."""
        self._need(1)
        return self.sum / self.count

    @property
    def covariance(self) -> Tensor:
        """Unbiased Σ = (Σxxᵀ − n μμᵀ) / (n − 1) (float64, (D, D))."""
        self._need(2)
        mu = self.mean
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2  # exactly symmetric (the sums are, up to the order of additions)

    def check_compatible(self, expected: FeatureStatistics | StatsKey, where: str) -> None:
        """Raise a one-line ValueError naming both sides and the fix when `expected` was made another way."""
        want = expected.key if isinstance(expected, FeatureStatistics) else expected
        have = self.key
        same_net = (have.network, have.num_features) == (want.network, want.num_features)
        same_res = None in (have.resolution, want.resolution) or have.resolution == want.resolution
        if same_net and same_res:
            return
        name = f"'{self.origin}'" if self.origin else f"of {self.source or 'unknown data'}"
        fix = (f"delete {name} so that they are recomputed" if self.origin
               else f"recompute the reference statistics with {want.network}")
        raise ValueError(f"{where}: reference statistics {name} were made with {have.describe()} but this run "
                         f"measures with {want.describe()}: {fix}")

    def save(self, path: str | Path) -> None:
        """Write a safetensors file: sum, outer, count, and the metadata as strings."""
        from safetensors.torch import save_file

        tensors = {"sum": self.sum.cpu().contiguous(), "outer": self.outer.cpu().contiguous(),
                   "count": torch.tensor([self.count], dtype=torch.long)}
        meta = {"format": FORMAT, "network": self.network, "source": self.source,
                "resolution": "" if self.resolution is None else str(self.resolution)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FeatureStatistics:
        """Read a file written by `save` (safetensors: no code runs); the path is kept for error messages."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"'{path}' is not an ldmlab feature statistics file (format "
                                 f"{meta.get('format')!r}, expected {FORMAT!r}): delete it so it is recomputed")
            tensors = {k: f.get_tensor(k) for k in ("sum", "outer", "count")}
        res = meta.get("resolution", "")
        stats = cls(tensors["sum"].shape[0], meta["network"], int(res) if res else None, meta.get("source", ""))
        stats.sum, stats.outer = tensors["sum"].to(device), tensors["outer"].to(device)
        stats.count, stats.origin = int(tensors["count"][0]), str(path)
        return stats

    def _like(self) -> FeatureStatistics:
        """Empty statistics with the same metadata and device."""
        out = FeatureStatistics(self.num_features, self.network, self.resolution, self.source, self.sum.device)
        out.origin = self.origin
        return out

    def _need(self, n: int) -> None:
        """Raise a one-line ValueError when fewer than `n` rows were added."""
        if self.count < n:
            raise ValueError(f"FeatureStatistics({self.network}, {self.source or 'unknown data'}): "
                             f"{self.count} feature rows, need at least {n}")

    def __repr__(self) -> str:
        return (f"FeatureStatistics({self.key.describe()}, n={self.count}, source={self.source!r}"
                f"{f', file={self.origin!r}' if self.origin else ''})")
