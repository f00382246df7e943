"""The demo's domain FID/KID: the judge's pooled features (no download) of held-out real crops against the
samples at each guidance scale, with the VAE reconstructions of those crops as the floor a sample set can reach
through this decoder. Numbers on these features compare runs of this demo, not published FIDs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ldmlab.data.transforms import normalize
from ldmlab.evaluation.features import build_feature_network
from ldmlab.metrics import SampleMetrics, reference_statistics

METRICS = ("fid", "kid", "precision", "recall")


@torch.no_grad()
def domain_scores(judge: Path, real: Tensor, image_sets: dict[str, Tensor], device: torch.device,
                  batch_size: int = 256) -> dict[str, dict[str, float]]:
    """{set name: fid, kid, kid_std, precision, recall} of each (N, 3, H, W) [-1, 1] set against `real`
    (uint8 (N, H, W, 3) held-out crops), on the judge's features; also the feature network's name."""
    network = build_feature_network("classifier", judge).to(device)
    reference, rows = reference_statistics(network, (normalize(c.to(device)) for c in real.split(batch_size)),
                                           source="held-out crops")
    scores: dict[str, dict[str, float]] = {}
    for name, images in image_sets.items():
        metrics = SampleMetrics(network, reference, rows, METRICS)
        for chunk in images.split(batch_size):
            metrics.update(chunk.to(device))
        scores[name] = metrics.compute()
    return {"features": network.name, "reference_n": reference.count, "sets": scores}
