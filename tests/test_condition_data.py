"""Image-condition data transforms: inpainting masks (ldmlab.data.masks), the masked image, and the low-res copy of
every crop (ldmlab.data.conditions), alone and through the configured demo DataModules (data=demo_sr, demo_inpaint)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_train
from PIL import Image

from ldmlab.data.conditions import InpaintDecoder, LowResDecoder, downsample, masked_image
from ldmlab.data.masks import MaskGenerator


def raw_sample(seed: int, size: tuple[int, int] = (40, 48)) -> dict:
    """A WebDataset-style raw sample: a random RGB PNG (H, W = size) and a label."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return {"__key__": f"s{seed}", "png": buf.getvalue(), "cls": b"3"}


# ---------------------------------------------------------------- masks


def test_masks_are_binary_seeded_and_sometimes_whole() -> None:
    gen, rng = MaskGenerator(), random.Random(0)
    masks = np.stack([gen(32, 40, rng) for _ in range(400)])
    assert masks.shape == (400, 32, 40) and masks.dtype == np.float32 and set(np.unique(masks)) == {0.0, 1.0}
    again = random.Random(0)
    assert all(np.array_equal(m, gen(32, 40, again)) for m in masks[:20])  # seeded: the same masks
    coverage = masks.mean(axis=(1, 2))
    whole = coverage == 1.0
    assert abs(whole.mean() - 0.25) < 0.08  # p_whole = 0.25 (SD-inpainting); binomial sd over 400 draws ≈ 0.022
    partial = coverage[~whole]
    assert (partial > 0).all() and (partial < 1).all()  # every other mask has a shape and leaves pixels
    assert 0.1 < partial.mean() < 0.3 and partial.std() > 0.05  # varied, neither specks nor near-whole


def test_rectangle_coverage_is_its_area() -> None:
    """One box of a quarter of each side: exactly round(H/4)·round(W/4) pixels, one solid rectangle."""
    gen, rng = MaskGenerator(p_whole=0.0, max_rects=1, max_strokes=0, rect_size=(0.25, 0.25)), random.Random(1)
    for _ in range(20):
        mask = gen(32, 40, rng)
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        assert mask.sum() == 8 * 10 and len(rows) == 8 and len(cols) == 10
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()


def test_strokes_only_and_whole_only() -> None:
    rng = random.Random(2)
    assert MaskGenerator(p_whole=1.0)(16, 16, rng).all()
    strokes = [MaskGenerator(p_whole=0.0, max_rects=0)(64, 64, rng) for _ in range(20)]
    assert all(0 < m.mean() < 1 for m in strokes)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"p_whole": 1.5}, "p_whole=1.5 must be in"),
    ({"max_rects": 0, "max_strokes": 0}, "not both 0"),
    ({"rect_size": (0.5, 0.1)}, r"rect_size=\[0.5, 0.1\]"),
    ({"stroke_vertices": (0, 3)}, "stroke_vertices"),
])
def test_mask_settings_are_refused_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        MaskGenerator(**kwargs)
    assert "\n" not in str(info.value) and "data.decoder.masks" in str(info.value)


def test_masked_image_is_zero_under_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    out = masked_image(image, mask)
    assert (out[mask.expand_as(out) == 1] == 0).all()
    assert torch.equal(out[mask.expand_as(out) == 0], image[mask.expand_as(image) == 0])


# ---------------------------------------------------------------- decoders


def test_low_res_is_the_downsampled_crop() -> None:
    """With the box filter the low-res image is the 4×4 block mean of the crop, within one uint8 level (PIL's
    fixed-point filter rounds)."""
    decoder = LowResDecoder(image_size=32, random_crop=True, random_flip=True, factor=4, resample="box")
    rng = random.Random(0)
    batch = decoder.collate([decoder(raw_sample(i), rng) for i in range(3)], rng)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["low_res"].shape == (3, 3, 8, 8)
    block_mean = F.avg_pool2d(batch["image"], 4)
    assert (batch["low_res"] - block_mean).abs().max() <= 1 / 127.5 + 1e-6
    bicubic = LowResDecoder(image_size=32, random_flip=False, factor=4)  # the default: antialiased bicubic
    pixels = bicubic(raw_sample(0), None)[0]
    assert np.array_equal(downsample(pixels, 4), np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BICUBIC)))


def test_uint8_transport_gives_the_same_batch() -> None:
    """Under a Trainer the batch travels as uint8 and `on_device` finishes it: the same numbers as the float path."""
    items = [raw_sample(i) for i in range(2)]
    plain = LowResDecoder(image_size=32, random_flip=False, factor=2)
    fast = plain.for_stream(False, on_device=True)
    a = plain.collate([plain(s, None) for s in items])
    b = fast.on_device(fast.collate([fast(s, None) for s in items]))
    assert b["low_res"].dtype == torch.float32 and torch.equal(a["low_res"], b["low_res"])
    assert torch.equal(a["image"], b["image"])


def test_inpaint_batches_carry_seeded_masks() -> None:
    decoder = InpaintDecoder(image_size=32, random_flip=False, masks={"p_whole": 0.0, "max_rects": 1, "max_strokes": 0})
    assert isinstance(decoder.masks, MaskGenerator)  # a config node without _target_ works too
    items = [decoder(raw_sample(i), None) for i in range(4)]
    a, b = decoder.collate(items, random.Random(5)), decoder.collate(items, random.Random(5))
    assert a["mask"].shape == (4, 1, 32, 32) and a["mask"].dtype == torch.float32 and torch.equal(a["mask"], b["mask"])
    assert 0 < a["mask"].mean() < 1


def test_factor_must_divide_the_image_side() -> None:
    with pytest.raises(ValueError, match="data.decoder.factor=3 does not divide the image side 32"):
        LowResDecoder(image_size=32, factor=3)


@pytest.mark.parametrize("option", ["demo_sr", "demo_inpaint"])
def test_configured_demo_data_gives_condition_batches(option: str, tmp_path: Path) -> None:
    """data=demo_sr | demo_inpaint composed by Hydra: 64 px crops with their low-res copy or mask; the validation
    batches (and masks) are the same on every pass."""
    cfg = compose_train([f"data={option}", "data.source.crops_per_image=8", "data.source.val_crops_per_image=4",
                         "data.batch_size=4", "data.num_workers=0"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    first, again = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert first["image"].shape == (4, 3, 64, 64)
    key, shape = ("low_res", (4, 3, 16, 16)) if option == "demo_sr" else ("mask", (4, 1, 64, 64))
    assert first[key].shape == shape and torch.equal(first[key], again[key])
    if option == "demo_sr":
        assert (first["low_res"] - F.avg_pool2d(first["image"], 4)).abs().mean() < 0.05  # the same picture, smaller
