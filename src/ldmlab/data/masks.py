"""Training masks for inpainting: random rectangles and brush strokes, sometimes the whole image (seeded).

A simplified version of the generators SD-inpainting trained with: LaMa's "thick"/"medium" masks (Suvorov et al.
2022, "Resolution-robust Large Mask Inpainting with Fourier Convolutions", sec. 3.3 and their
`gen_mask`: polylines of random angle, length and width drawn with round joints, plus axis-aligned boxes), and
SD-inpainting's model card: "synthetic masks and, in 25 % of cases, everything masked". 1 marks a pixel to
inpaint (diffusers' convention: white = repaint).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


def _fraction_pair(name: str, pair: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) with 0 < lo <= hi <= 1, else one line naming the field."""
    lo, hi = (float(v) for v in pair)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.decoder.masks.{name}={list(pair)} must be [lo, hi] with 0 < lo <= hi <= 1 "
                         "(fractions of the image side), e.g. [0.1, 0.5]")
    return lo, hi


@dataclass
class MaskGenerator:
    """Random inpainting masks (H, W) float32 in {0, 1}: with probability `p_whole` all ones; otherwise up to
    `max_rects` rectangles (sides a fraction `rect_size` of H and W) and up to `max_strokes` brush strokes
    (`stroke_vertices` segments of length `stroke_length` × side, width `stroke_width` × side), at least one shape."""

    p_whole: float = 0.25
    max_rects: int = 2
    rect_size: Sequence[float] = (0.1, 0.5)
    max_strokes: int = 3
    stroke_vertices: Sequence[int] = (2, 6)
    stroke_length: Sequence[float] = (0.1, 0.4)
    stroke_width: Sequence[float] = (0.05, 0.15)

    def __post_init__(self) -> None:
        if not 0 <= self.p_whole <= 1:
            raise ValueError(f"data.decoder.masks.p_whole={self.p_whole} must be in [0, 1], e.g. 0.25 (SD-inpainting)")
        if self.max_rects < 0 or self.max_strokes < 0 or self.max_rects + self.max_strokes == 0:
            raise ValueError(f"data.decoder.masks: max_rects={self.max_rects} and max_strokes={self.max_strokes} "
                             "must be >= 0 and not both 0 (a mask needs a shape), e.g. max_rects=2 max_strokes=3")
        lo, hi = (int(v) for v in self.stroke_vertices)
        if not 1 <= lo <= hi:
            raise ValueError(f"data.decoder.masks.stroke_vertices={list(self.stroke_vertices)} must be [lo, hi] "
                             "with 1 <= lo <= hi, e.g. [2, 6]")
        for name in ("rect_size", "stroke_length", "stroke_width"):
            _fraction_pair(name, getattr(self, name))

    def __call__(self, height: int, width: int, rng: random.Random) -> np.ndarray:
        """One (height, width) float32 mask drawn from `rng`; 1 = inpaint."""
        if rng.random() < self.p_whole:
            return np.ones((height, width), np.float32)
        rects, strokes = rng.randint(0, self.max_rects), rng.randint(0, self.max_strokes)
        if rects + strokes == 0:  # an empty mask would teach nothing: one shape of an allowed kind
            rects, strokes = (1, 0) if self.max_strokes == 0 or (self.max_rects and rng.random() < 0.5) else (0, 1)
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(rects):
            self._rectangle(draw, height, width, rng)
        for _ in range(strokes):
            self._stroke(draw, height, width, rng)
        return (np.asarray(canvas) > 0).astype(np.float32)

    def _rectangle(self, draw: ImageDraw.ImageDraw, height: int, width: int, rng: random.Random) -> None:
        """An axis-aligned box: sides uniform in rect_size × (H, W), position uniform inside the image."""
        lo, hi = _fraction_pair("rect_size", self.rect_size)
        h, w = max(1, round(rng.uniform(lo, hi) * height)), max(1, round(rng.uniform(lo, hi) * width))
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        draw.rectangle((left, top, left + w - 1, top + h - 1), fill=255)

    def _stroke(self, draw: ImageDraw.ImageDraw, height: int, width: int, rng: random.Random) -> None:
        """A polyline from a uniform start: random angle and length per segment, round joints (LaMa)."""
        side = min(height, width)
        lo, hi = (int(v) for v in self.stroke_vertices)
        thick = max(1, round(rng.uniform(*_fraction_pair("stroke_width", self.stroke_width)) * side))
        x, y = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
        r = thick / 2
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        for _ in range(rng.randint(lo, hi)):
            angle = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(*_fraction_pair("stroke_length", self.stroke_length)) * side
            nx = min(max(x + length * math.cos(angle), 0), width - 1)
            ny = min(max(y + length * math.sin(angle), 0), height - 1)
            draw.line((x, y, nx, ny), fill=255, width=thick)
            draw.ellipse((nx - r, ny - r, nx + r, ny + r), fill=255)
            x, y = nx, ny
