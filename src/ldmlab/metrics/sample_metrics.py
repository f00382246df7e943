"""Generated-sample metrics against a reference: one feature-network pass feeds FID, KID, IS and precision/recall.

`SampleMetrics` is what the in-loop callback and `python -m ldmlab.evaluate` hold: built before sampling (its
constructor refuses, in one line, reference statistics made another way and sample counts too small for FD),
`update(images)` on each rank's share of generated images, `compute()` on all ranks together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ldmlab.metrics.distributed import all_gather_rows, broadcast_object
from ldmlab.metrics.frechet import check_sample_count, frechet_distance
from ldmlab.metrics.manifold import precision_recall
from ldmlab.metrics.scores import inception_score, kernel_inception_distance
from ldmlab.metrics.statistics import FeatureStatistics, StatsKey
from ldmlab.utils.distributed import this_rank

METRICS = ("fid", "kid", "is", "precision", "recall")
_NEED_REFERENCE_FEATURES = ("kid", "precision", "recall")


@runtime_checkable
class FeatureNetwork(Protocol):
    """What the metrics need of a feature network (an nn.Module): images in [-1, 1], (B, 3, H, W) → (B, D)."""

    name: str  # e.g. "inception-v3-fid": recorded in the statistics, compared with the reference's
    num_features: int  # D
    has_logits: bool  # whether `logits(images)` gives class logits (Inception Score)

    def __call__(self, images: Tensor) -> Tensor: ...

    def logits(self, images: Tensor) -> Tensor: ...


def image_resolution(images: Tensor) -> int:
    """The side of square images (B, 3, H, W) in pixels (the resolution recorded in statistics)."""
    return int(images.shape[-1])


@torch.no_grad()
def reference_statistics(network: FeatureNetwork, images_iter: Iterable[Tensor], source: str,
                         keep_features: bool = True, device: torch.device | str | None = None,
                         ) -> tuple[FeatureStatistics, Tensor | None]:
    """Statistics (and, for KID / precision / recall, the rows) of real images: each rank iterates its share.

    Images are float tensors in [-1, 1], (B, 3, H, W), moved to `device` when given. A collective under
    torch.distributed: sums are all-reduced and rows gathered, so every rank returns those of all ranks' images.
    """
    stats = FeatureStatistics(network.num_features, network.name, None, source)
    kept: list[Tensor] = []
    for images in images_iter:
        res = image_resolution(images)
        if stats.resolution not in (None, res):
            raise ValueError(f"reference_statistics({source}): images of {res} px after {stats.resolution} px; "
                             f"resize the reference images to one resolution")
        stats.resolution = res
        with torch.autocast(images.device.type, enabled=False):  # fp32 features, as on the generated side
            features = network((images if device is None else images.to(device)).float())
        stats.update(features)
        if keep_features:
            kept.append(features.float())
    resolution = broadcast_object(stats.resolution)  # a rank with no images learns it from rank 0
    stats = stats.all_reduce()
    stats.resolution = resolution
    if not keep_features:
        return stats, None
    local = torch.cat(kept) if kept else torch.zeros(0, network.num_features, device=stats.sum.device)
    return stats, all_gather_rows(local)


@dataclass
class MetricOptions:
    """The metrics' own knobs (defaults: the papers' / torch-fidelity's), and the names used in refusals."""

    kid_subsets: int = 100  # Bińkowski et al. 2018: 100 subsets of 1000
    kid_subset_size: int = 1000  # capped at the smaller set's size
    is_splits: int = 10  # Salimans et al. 2016
    pr_k: int = 3  # Kynkäänniemi et al. 2019
    seed: int = 0  # KID's subsets
    where: str = "SampleMetrics"  # starts every error line, e.g. "callbacks.sample_metrics"
    samples_setting: str = "num_samples"  # what the user sets for more generated samples
    reference_setting: str = "the number of reference images"  # ... for more reference images


class SampleMetrics:
    """FID, KID, IS and precision/recall of generated images against a reference, summed over DDP ranks.

    `reference_features` (rows of the reference images) are needed for KID and precision/recall; `resolution`
    and `num_samples`, when known, are checked against the reference and FD's minimum at construction.
    """

    def __init__(self, network: FeatureNetwork, reference: FeatureStatistics,
                 reference_features: Tensor | None = None, metrics: Sequence[str] = METRICS,
                 resolution: int | None = None, num_samples: int | None = None,
                 options: MetricOptions | None = None) -> None:
        self.network, self.reference, self.reference_features = network, reference, reference_features
        self.metrics, self.resolution = tuple(metrics), resolution
        self.options = options or MetricOptions()
        self.where = self.options.where
        self._check(num_samples)
        self.reset()

    def _check(self, num_samples: int | None) -> None:
        """Everything that can be refused before sampling, each in one line."""
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"{self.where}: unknown metrics {unknown}; choose from {list(METRICS)}")
        net = self.network
        self.reference.check_compatible(StatsKey(net.name, net.num_features, self.resolution), self.where)
        if "is" in self.metrics and not getattr(net, "has_logits", False):
            raise ValueError(f"{self.where}: Inception Score needs class logits but feature network {net.name} "
                             f"has none: drop 'is' from the metrics or use an Inception network")
        wanted = [m for m in _NEED_REFERENCE_FEATURES if m in self.metrics]
        ref = self.reference_features
        if wanted and (ref is None or ref.ndim != 2 or ref.shape[1] != net.num_features):
            got = "none" if ref is None else f"shape {tuple(ref.shape)}"
            raise ValueError(f"{self.where}: {'/'.join(wanted)} need the reference feature rows (N, "
                             f"{net.num_features}) of {net.name}, got {got}: recompute the reference with "
                             f"keep_features=True or drop {wanted} from the metrics")
        if "fid" in self.metrics:
            check_sample_count(self.reference.count, net.num_features, self.options.reference_setting,
                               f"reference images ({self.reference.origin or self.reference.source})", self.where)
            if num_samples is not None:
                check_sample_count(num_samples, net.num_features, self.options.samples_setting, "generated samples",
                                   self.where)

    def reset(self) -> None:
        """Forget the generated images seen so far (the reference stays)."""
        net = self.network
        self.stats = FeatureStatistics(net.num_features, net.name, self.resolution, "generated")
        self.features: list[Tensor] = []
        self.logits: list[Tensor] = []

    @torch.no_grad()
    def update(self, fake_images: Tensor) -> None:
        """Run the feature network on generated images in [-1, 1], (B, 3, H, W), and keep what compute needs."""
        res = image_resolution(fake_images)
        if self.stats.resolution is None:
            self.stats.resolution = res
            self.reference.check_compatible(self.stats.key, self.where)
        elif res != self.stats.resolution:
            raise ValueError(f"{self.where}: generated images of {res} px, but these metrics were set up for "
                             f"{self.stats.resolution} px images (resolution={self.stats.resolution})")
        features, logits = self._run(fake_images)
        self.stats.update(features)
        if any(m in self.metrics for m in _NEED_REFERENCE_FEATURES):
            self.features.append(features.float())
        if logits is not None:
            self.logits.append(logits.float())

    def _run(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features (and IS's logits) in fp32, outside any autocast (FID is defined on fp32 features); one
        forward pass for both where the network offers `features_and_logits`."""
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            if "is" not in self.metrics:
                return self.network(images), None
            both = getattr(self.network, "features_and_logits", None)
            return both(images) if both is not None else (self.network(images), self.network.logits(images))

    def compute(self) -> dict[str, float]:
        """The metrics over every rank's images; a collective, and every rank gets rank 0's dict (or its error)."""
        stats = self.stats.all_reduce()
        features = logits = None
        if any(m in self.metrics for m in _NEED_REFERENCE_FEATURES):
            features = all_gather_rows(self._cat(self.features, self.network.num_features, stats.sum.device))
        if "is" in self.metrics:
            logits = all_gather_rows(self._cat(self.logits, self._num_classes(), stats.sum.device))
        result: dict[str, float] | Exception | None = None
        error: Exception | None = None
        if this_rank() == 0:
            try:
                result = self._compute_local(stats, features, logits)
            except Exception as err:  # noqa: BLE001  (re-raised below on every rank: none waits for the others)
                error = err
                result = err if isinstance(err, ValueError) else RuntimeError(
                    f"{self.where}: rank 0 failed to compute the metrics: {type(err).__name__}: {err}")
        result = broadcast_object(result)
        if error is not None:
            raise error
        if isinstance(result, Exception):
            raise result
        assert result is not None
        return result

    def _compute_local(self, stats: FeatureStatistics, features: Tensor | None,
                       logits: Tensor | None) -> dict[str, float]:
        """The metrics from reduced statistics and gathered rows (rank 0 only: one result for all)."""
        out: dict[str, float] = {}
        opt = self.options
        if "fid" in self.metrics:
            check_sample_count(stats.count, stats.num_features, self.options.samples_setting, "generated samples",
                               self.where)
            # generated side first: the math runs on its device (the GPU in training), FD is symmetric
            out["fid"] = frechet_distance(stats.mean, stats.covariance, self.reference.mean,
                                          self.reference.covariance)
        ref = self.reference_features
        if "kid" in self.metrics and features is not None and ref is not None:
            out["kid"], out["kid_std"] = kernel_inception_distance(ref, features, opt.kid_subsets,
                                                                   opt.kid_subset_size, opt.seed)
        if "is" in self.metrics and logits is not None:
            out["is"], out["is_std"] = inception_score(logits, opt.is_splits)
        if {"precision", "recall"} & set(self.metrics) and features is not None and ref is not None:
            precision, recall = precision_recall(ref, features, opt.pr_k)
            out |= {m: v for m, v in (("precision", precision), ("recall", recall)) if m in self.metrics}
        return out

    def _num_classes(self) -> int:
        """The logit width, agreed over ranks (a rank that saw no images has no logits to read it from)."""
        width = self.logits[0].shape[1] if self.logits else 0
        return int(all_gather_rows(torch.tensor([[width]], device=self.stats.sum.device)).max())

    @staticmethod
    def _cat(rows: list[Tensor], width: int, device: torch.device) -> Tensor:
        """The kept rows as one (n, width) float32 tensor ((0, width) when this rank saw no images)."""
        return torch.cat(rows) if rows else torch.zeros(0, width, device=device)
