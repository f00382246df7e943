"""Sample-quality metrics, distributed-aware: FID, KID, IS, improved precision/recall, CLIP score; PSNR, SSIM.

Feature networks (Inception-v3, CLIP, ...) are plain nn.Modules defined elsewhere (`FeatureNetwork` says what
is needed of them); this package only accumulates their outputs across batches and DDP ranks and does the math.
Imports torch, numpy and safetensors only (torchmetrics is the tests' cross-check): no Lightning, Hydra, W&B.
"""

from ldmlab.metrics.distributed import all_gather_rows, all_reduce_sum, broadcast_object, is_distributed
from ldmlab.metrics.frechet import check_sample_count, frechet_distance, min_samples_fd, sqrtm_psd
from ldmlab.metrics.manifold import precision_recall
from ldmlab.metrics.pixels import PIXEL_METRICS, PixelFidelity, psnr, ssim
from ldmlab.metrics.sample_metrics import (
    METRICS,
    FeatureNetwork,
    MetricOptions,
    SampleMetrics,
    reference_statistics,
)
from ldmlab.metrics.scores import (
    ClipScore,
    clip_score,
    inception_score,
    kernel_inception_distance,
    polynomial_mmd,
)
from ldmlab.metrics.statistics import FeatureStatistics, StatsKey

__all__ = [
    "METRICS", "PIXEL_METRICS", "ClipScore", "FeatureNetwork", "FeatureStatistics", "MetricOptions", "PixelFidelity",
    "SampleMetrics", "StatsKey", "all_gather_rows",
    "all_reduce_sum", "broadcast_object", "check_sample_count", "clip_score", "frechet_distance",
    "inception_score", "is_distributed", "kernel_inception_distance", "min_samples_fd", "polynomial_mmd",
    "precision_recall", "psnr", "reference_statistics", "sqrtm_psd", "ssim",
]
