"""One guidance scale's scores: n fixed-seed samples of this rank's chunks → SampleMetrics (+ CLIP score for text
models measured with CLIP features), shared by the in-loop callback and `python -m ldmlab.evaluate`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ldmlab.evaluation.clip import ClipTowers
from ldmlab.evaluation.samples import Chunk, SampleCache, chunks, conditions, from_uint8, generate
from ldmlab.metrics import ClipScore, FeatureStatistics, MetricOptions, SampleMetrics

TEXT_METRICS = ("clip_score",)


def check_text_metrics(metrics: Sequence[str], module: Any, network: Any, where: str) -> None:
    """CLIP score (Hessel et al. 2021) scores samples against their prompts with CLIP towers: one line when the
    model has no prompts or the features are not CLIP's, before anything is sampled."""
    from ldmlab.lit.conditioning import TextConditioner

    if "clip_score" not in metrics:
        return
    has_prompts, on_clip = isinstance(module.conditioner, TextConditioner), isinstance(network, ClipTowers)
    if not has_prompts:  # a config mistake (ValueError), not a programming one
        kind = type(module.conditioner).__name__ if module.conditioner is not None else "an unconditional model"
        raise ValueError(f"{where}: clip_score scores samples against their prompts, but this model has "
                         f"{kind}, no prompts: drop clip_score from the metrics")
    if not on_clip:
        raise ValueError(f"{where}: clip_score needs CLIP towers, not {network.name}: set features.name=clip "
                         "features.path=<a local transformers CLIP directory>")


@dataclass
class Plan:
    """What an evaluation samples: n images per guidance scale in chunks of batch_size, seeded from seed."""

    n: int
    batch_size: int
    seed: int = 0
    metrics: Sequence[str] = ("fid", "kid", "precision", "recall")
    sampler: Any = None  # None: the model's own sampler
    prompts: Sequence[str] = ()  # text models: prompt i mod len for sample i


def score_guidance(module: Any, network: Any, reference: FeatureStatistics, rows: Tensor | None, guidance: float,
                   plan: Plan, rank: int = 0, world_size: int = 1, options: MetricOptions | None = None,
                   cache: SampleCache | None = None,
                   on_chunk: Callable[[Chunk, Tensor], None] | None = None) -> dict[str, float]:
    """The metrics of `plan.n` samples at `guidance` (a collective under torch.distributed: every rank calls it
    and gets the same dict). `cache` keeps finished chunks on disk; `on_chunk(chunk, uint8 pixels)` sees each."""
    image_metrics = [m for m in plan.metrics if m not in TEXT_METRICS]
    metrics = SampleMetrics(network, reference, rows, image_metrics, num_samples=plan.n, options=options)
    condition = conditions(module, plan.prompts)
    clip = ClipScore() if "clip_score" in plan.metrics else None
    for chunk in chunks(plan.n, plan.batch_size, rank, world_size, plan.seed):
        make = lambda c=chunk: generate(module, c, guidance, condition, plan.sampler)
        pixels = cache.get_or_make(guidance, chunk, make) if cache is not None else make()
        images = from_uint8(pixels, module.device)
        metrics.update(images)
        if clip is not None:  # Hessel et al. 2021: 100·max(cos(image, prompt), 0)
            clip.update(network.image_embeds(images), network.text_embeds(condition(range(chunk.start, chunk.stop))))
        if on_chunk is not None:
            on_chunk(chunk, pixels)
    scores = metrics.compute()
    if clip is not None:
        scores["clip_score"] = clip.compute()
    return scores
