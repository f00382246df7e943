"""Image-conditioned checkpoints (super-resolution, inpainting) in `python -m ldmlab.evaluate`: scored against
held-out ground truth. Sample i is conditioned on held-out image i's condition (its low-res copy, or the image
under its mask: the data decoder's seeded masks, those of validation) and compared with image i: per-image PSNR
and SSIM, and FID/KID/IS/precision/recall of the samples against the same images' features (SR3, Saharia et al.
2021, reports both kinds). Two baselines are scored the same way: the condition's own picture (bicubic
upsampling, the masked crop) and the images through the VAE, the ceiling of any latent model on them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldmlab.evaluation.reference import Reference
from ldmlab.evaluation.samples import Chunk, SampleCache, chunks, from_uint8, to_uint8
from ldmlab.evaluation.score import Plan
from ldmlab.metrics import METRICS, MetricOptions, PixelFidelity, SampleMetrics

Batch = dict[str, Any]  # tensors and lists (keys, captions) of one chunk's rows
Produce = Callable[[Chunk, Batch], Tensor]  # a chunk's images, (B, 3, H, W) in [-1, 1], to score


def held_out_loader(datamodule: Any) -> Iterable[Batch]:
    """The validation batches, all of them on every rank (a shard module's own split would give each rank its
    share; here ranks split chunks, so that image i is the same whatever the number of ranks)."""
    from ldmlab.data.module import ShardDataModule

    return datamodule.full_val_dataloader() if isinstance(datamodule, ShardDataModule) else datamodule.val_dataloader()


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, Tensor) else [*a, *b]


def _rows(batch: Batch, keep: list[int]) -> Batch:
    """The batch's tensor and list entries at rows `keep`."""
    index = torch.tensor(keep, dtype=torch.long)
    return {k: v[index] if isinstance(v, Tensor) else [v[i] for i in keep] for k, v in batch.items()
            if isinstance(v, (Tensor, list))}


def unique_rows(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches without rows whose "key" came before: a validation stream pads its last batch by
    wrapping around (ldmlab.data.pipeline, eval mode), and an image scored twice would count twice."""
    seen: set[str] = set()
    for batch in loader:
        keys = batch.get("key")
        if keys is None:
            yield batch
            continue
        keep = [i for i, key in enumerate(keys) if key not in seen]
        seen.update(keys)
        if keep:
            yield _rows(batch, keep)


def rebatched(loader: Iterable[Batch], n: int, batch_size: int, seed: int = 0) -> Iterator[tuple[Chunk, Batch]]:
    """The first n distinct images of `loader` as `chunks(n, batch_size, seed=seed)`, every tensor and list
    entry cut to the chunk's rows; one line naming n when the data hold fewer images."""
    source, pending, have = unique_rows(loader), None, 0
    for chunk in chunks(n, batch_size, seed=seed):
        size = chunk.stop - chunk.start
        while have < size:
            batch = next(source, None)
            if batch is None:
                seen = chunk.start + have
                raise ValueError(f"n={n}: the held-out data hold {seen} images to condition samples on: set n={seen} "
                                 "or fewer (an image-conditioned model draws one sample per held-out image)")
            rows = _rows(batch, list(range(len(batch["image"]))))
            pending = rows if pending is None else {k: _cat(pending[k], rows[k]) for k in pending}
            have = len(pending["image"])
        assert pending is not None
        yield chunk, {k: v[:size] for k, v in pending.items()}
        pending, have = {k: v[size:] for k, v in pending.items()}, have - size


def quantized(images: Tensor) -> Tensor:
    """Images as a PNG would hold them (uint8 and back), as the cached samples are: every set scores alike."""
    return from_uint8(to_uint8(images), images.device)


def on_device(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The batch's tensors on `device` (the image condition's inputs)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}


def sampled(module: Any, guidance: float, sampler: Any, cache: SampleCache | None = None) -> Produce:
    """A chunk's samples, each conditioned on its held-out image's condition (noise seeded by the chunk, so
    sample i is the same on any number of ranks), kept in `cache` as uint8."""
    from ldmlab.sample import latent_shape

    def produce(chunk: Chunk, batch: Batch) -> Tensor:
        def make() -> Tensor:
            n, (h, w) = len(batch["image"]), batch["image"].shape[-2:]
            values = None if module.conditioner is None else module.conditioner.grid_values(batch, n)
            return to_uint8(module.sample(values, n, guidance, seed=chunk.seed, latent_shape=latent_shape(
                module, h, w), sampler=sampler, images=on_device(batch, module.device)))

        return from_uint8(cache.get_or_make(guidance, chunk, make) if cache is not None else make(), module.device)

    return produce


def pasted(module: Any, produce: Produce) -> Produce:
    """`produce`'s images with the pixels the condition gives put back (inpainting: outside the mask)."""
    return lambda chunk, batch: module.image_condition.paste(on_device(batch, module.device), produce(chunk, batch))


def baselines(module: Any) -> dict[str, Produce]:
    """What a sample should beat, by name: the condition's own picture (bicubic upsampling, the masked crop)
    and the held-out images through the VAE (posterior mean: the ceiling of any model on its latents)."""
    condition, vae = module.image_condition, module.vae

    @torch.no_grad()
    def picture(chunk: Chunk, batch: Batch) -> Tensor:
        return quantized(condition.picture(on_device(batch, module.device), tuple(batch["image"].shape[-2:])))

    @torch.no_grad()
    def reconstruction(chunk: Chunk, batch: Batch) -> Tensor:
        x = batch["image"].to(module.device)
        return quantized(vae.decode(vae.encode(x).mode()).clamp(-1, 1))

    return {condition.baseline: picture, "VAE reconstruction": reconstruction}


@dataclass
class PairedScores:
    """Scores image sets paired with the held-out images: `pairs()` gives this rank's chunks of them (every rank
    calls `score` together), `reference` their feature statistics (and rows, for KID and precision/recall)."""

    network: Any
    reference: Reference
    pairs: Callable[[], Iterator[tuple[Chunk, Batch]]]
    plan: Plan
    options: MetricOptions | None = None

    def score(self, produce: Produce, on_chunk: Callable[[Chunk, Tensor], None] | None = None) -> dict[str, float]:
        """plan.metrics of the images `produce` makes for every chunk, against the chunk's held-out images."""
        stats, rows = self.reference
        wanted = [m for m in self.plan.metrics if m in METRICS]
        features = SampleMetrics(self.network, stats, rows, wanted, num_samples=self.plan.n,
                                 options=self.options) if wanted else None
        pixels = PixelFidelity()
        for chunk, batch in self.pairs():
            images = produce(chunk, batch)
            pixels.update(images, batch["image"].to(images.device))
            if features is not None:
                features.update(images)
            if on_chunk is not None:
                on_chunk(chunk, images)
        pixel_scores = {k: v for k, v in pixels.compute().items() if k in self.plan.metrics}
        return {**(features.compute() if features is not None else {}), **pixel_scores}


def paired_rows(module: Any, scores: PairedScores, guidance: Sequence[float], sampler: Any,
                cache: SampleCache | None = None, on_chunk: Callable[[Chunk, Tensor], None] | None = None,
                ) -> tuple[list[dict], list[dict]]:
    """The samples' scores, one row per guidance scale, and those of the other image sets, named by "images":
    the samples with the given pixels pasted back (inpainting), the condition's picture, the VAE reconstruction."""
    others = [{"images": name, **scores.score(produce)} for name, produce in baselines(module).items()]
    rows, kept = [], []
    for g in guidance:
        rows.append({"guidance": g, **scores.score(sampled(module, g, sampler, cache), on_chunk)})
        if module.image_condition.keeps_pixels:  # as an inpainting tool shows its result
            kept.append({"images": f"samples, guidance {g:g}, known pixels pasted back",
                         **scores.score(pasted(module, sampled(module, g, sampler, cache)))})
    return rows, kept + others


def grid_rows(module: Any, first: tuple[Chunk, Batch], guidance: Sequence[float], sampler: Any,
              cache: SampleCache | None, columns: int) -> tuple[Tensor, list[str]]:
    """The first `columns` held-out images as rows: the condition as given, the baselines, the samples at every
    guidance scale (from the cache), the truth; (rows × columns, 3, H, W) images and the rows' names."""
    chunk, batch = first
    batch = {k: v[:columns] for k, v in batch.items()}
    truth = batch["image"].to(module.device)
    shown = module.image_condition.shown(on_device(batch, module.device), tuple(truth.shape[-2:]))
    rows = {"condition (input)": quantized(shown)}
    for name, produce in baselines(module).items():
        images = produce(chunk, batch)
        if not torch.equal(images, rows["condition (input)"]):  # inpainting: the masked crop is the input
            rows[name] = images
    for g in guidance:  # the cache holds the whole chunk: its first rows are these
        rows[f"sample, guidance {g:g}"] = sampled(module, g, sampler, cache)(chunk, first[1])[:columns]
    rows["held-out truth"] = truth
    return torch.cat([r.cpu() for r in rows.values()]), list(rows)
