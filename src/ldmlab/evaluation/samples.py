"""Fixed-seed evaluation samples, split over ranks: sample i gets the same noise, label or prompt whatever the
number of ranks (noise is drawn per chunk of `batch_size` samples, chunk c seeded `seed + c`, chunk c made by rank
c mod world size), and chunks written to disk are not made again (an interrupted evaluation resumes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Chunk:
    """Samples [start, stop) of an evaluation, drawn from seed `seed`."""

    index: int
    start: int
    stop: int
    seed: int


def chunks(n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> list[Chunk]:
    """This rank's chunks of n samples."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n} and batch_size={batch_size} must be positive")
    starts = range(0, n, batch_size)
    return [Chunk(i, s, min(s + batch_size, n), seed + i) for i, s in enumerate(starts) if i % world_size == rank]


def conditions(module: Any, prompts: Sequence[str] = ()) -> Callable[[range], list[Any] | None]:
    """What sample i is conditioned on: label i mod K (class models), prompts[i mod len] (text models), None."""
    from ldmlab.lit.conditioning import ClassConditioner, TextConditioner

    conditioner = module.conditioner
    if isinstance(conditioner, ClassConditioner):
        return lambda idx: [i % conditioner.num_classes for i in idx]
    if isinstance(conditioner, TextConditioner):
        if not prompts:
            raise ValueError("a text-conditional model needs prompts to evaluate: captions in the reference data "
                             "(data.decoder.text_key) or prompts=<file with one prompt per line>")
        return lambda idx: [prompts[i % len(prompts)] for i in idx]
    return lambda idx: None


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats → uint8 pixels (what a PNG would hold), so cached and fresh samples score the same."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(pixels: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 pixels → [-1, 1] floats."""
    return pixels.to(device).float() / 127.5 - 1


def generate(module: Any, chunk: Chunk, guidance: float, condition: Callable[[range], list[Any] | None],
             sampler: Any = None) -> Tensor:
    """The chunk's samples as uint8 (B, 3, H, W)."""
    idx = range(chunk.start, chunk.stop)
    images = module.sample(condition(idx), len(idx), guidance, seed=chunk.seed, sampler=sampler)
    return to_uint8(images)


class SampleCache:
    """Chunks of uint8 samples under `root/g<guidance>/`: written once, read back on a resumed evaluation."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, guidance: float, chunk: Chunk) -> Path:
        return self.root / f"g{guidance:g}" / f"chunk{chunk.index:06d}_{chunk.start}-{chunk.stop}_s{chunk.seed}.pt"

    def get_or_make(self, guidance: float, chunk: Chunk, make: Callable[[], Tensor]) -> Tensor:
        """The cached chunk, or `make()` saved first (atomically: a killed run leaves no half file)."""
        path = self.path(guidance, chunk)
        if path.exists():
            return torch.load(path, weights_only=True)
        pixels = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(pixels, tmp)
        tmp.replace(path)
        return pixels


def batches(images: Iterator[Tensor] | Sequence[Tensor], device: torch.device | str) -> Iterator[Tensor]:
    """uint8 chunks → float [-1, 1] batches on `device`."""
    for pixels in images:
        yield from_uint8(pixels, device)
