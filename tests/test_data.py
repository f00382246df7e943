"""Demo shards are real photo crops; DataModules give the documented batches, equally many on every rank."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from test_data_pipeline import image_module

from ldmlab.data import demo
from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.demo import DemoShards, DemoSpec, build_demo_shards, class_names, cut_crop, load_photo
from ldmlab.data.filters import BadSamplesError
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader, ShardStream
from ldmlab.data.shards import count_samples, expand_urls, slot_shards
from ldmlab.data.transforms import (
    ImageTransform,
    center_crop,
    random_crop,
    random_hflip,
    resize_shorter,
    to_pil,
    to_tensor,
)

SMALL = {"crop_size": 16, "crops_per_image": 20, "val_crops_per_image": 6, "shard_size": 50}


def read_shards(directory: Path, split: str) -> list[dict]:
    """All samples of a split: key, decoded crop (H, W, 3), label and metadata."""
    out = []
    for path in sorted(directory.glob(f"{split}-*.tar")):
        for s in wds.tarfile_samples([{"url": str(path)}]):
            out.append({"key": s["__key__"], "crop": np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB")),
                        "label": int(s["cls"]), "meta": json.loads(s["json"])})
    return out


def find_in_photo(crop: np.ndarray, photo: np.ndarray) -> list[tuple[int, int]]:
    """Every (x, y) where `crop` occurs in `photo` exactly, by brute force (no metadata used)."""
    s = crop.shape[0]
    h, w = photo.shape[0] - s + 1, photo.shape[1] - s + 1
    cand = np.ones((h, w), bool)
    for j in range(s):  # narrow candidates with the first row, then check whole patches
        cand &= (photo[:h, j:j + w] == crop[0, j]).all(-1)
    return [(x, y) for y, x in zip(*np.nonzero(cand)) if np.array_equal(photo[y:y + s, x:x + s], crop)]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo_shards(tmp_path_factory.mktemp("data"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [load_photo(n) for n in class_names()]


# ---------------------------------------------------------------- demo shards


def test_demo_layout_and_manifest(demo_dir):
    names = class_names()
    assert names[:3] == ["astronaut", "chelsea", "coffee"] and len(names) == 10
    assert json.loads((demo_dir / "classes.json").read_text()) == names
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"samples": 200, "shards": 4}, "val": {"samples": 60, "shards": 2}}
    assert sorted(p.name for p in demo_dir.glob("*.tar")) == [f"train-00000{i}.tar" for i in range(4)] + [
        "val-000000.tar", "val-000001.tar"]
    assert count_samples(expand_urls(str(demo_dir / "train-{000000..000003}.tar"))) == 200


def test_every_listed_photo_loads_offline():
    names = class_names(grayscale=True)
    assert len(names) == 20 and names[:10] == class_names()
    for name in names:
        photo = load_photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8 and min(photo.shape[:2]) >= 172
    with pytest.raises(ValueError, match="scale"):
        demo.as_scale((0.5, 0.1))


def test_demo_crops_are_pixels_of_their_source_photo(demo_dir, photos):
    samples = read_shards(demo_dir, "train") + read_shards(demo_dir, "val")
    assert len(samples) == 260
    for s in samples:
        x0, y0, x1, y1 = s["meta"]["box"]
        assert s["meta"]["source"] == class_names()[s["label"]] and s["key"].startswith(s["meta"]["source"])
        assert s["crop"].shape == (16, 16, 3)
        assert np.array_equal(s["crop"], photos[s["label"]][y0:y1, x0:x1])
    # Without the metadata: a brute-force search finds each crop in its labelled photo, at its box.
    for s in samples[::37]:
        assert tuple(s["meta"]["box"][:2]) in find_in_photo(s["crop"], photos[s["label"]])


def test_train_and_val_crops_never_share_pixels(demo_dir, photos):
    boxes = {split: read_shards(demo_dir, split) for split in ("train", "val")}
    for label, photo in enumerate(photos):
        strip_x0 = demo.split_bounds(photo.shape[1], 0.2)[0]
        train = [s["meta"]["box"] for s in boxes["train"] if s["label"] == label]
        val = [s["meta"]["box"] for s in boxes["val"] if s["label"] == label]
        assert len(train) == 20 and len(val) == 6
        assert max(b[2] for b in train) <= strip_x0 <= min(b[0] for b in val)


def test_scaled_crops_cover_varied_fractions(tmp_path, photos):
    d = build_demo_shards(tmp_path, scale=(0.1, 0.3), **SMALL)
    samples = read_shards(d, "train")
    sides = [s["meta"]["box"][2] - s["meta"]["box"][0] for s in samples]
    assert min(sides) < max(sides) and max(sides) > 16
    for s in samples[::25]:
        assert np.array_equal(s["crop"], cut_crop(photos[s["label"]], s["meta"]["box"], 16))


def test_aspect_crops_vary_in_ratio_at_about_the_crop_area(tmp_path, photos):
    """data.source.aspect (for buckets): W/H within [1/aspect, aspect], ~crop_size² pixels, held-out strip kept;
    square specs keep their directory name, so existing demo shards are reused."""
    d = build_demo_shards(tmp_path, aspect=2.0, **SMALL)
    assert d.name != DemoSpec(**SMALL).dirname() and DemoSpec().dirname() == "c32-n500-v50-s0-ebd0b9fc"
    for split in ("train", "val"):
        samples = read_shards(d, split)
        ratios = [s["crop"].shape[1] / s["crop"].shape[0] for s in samples]
        assert min(ratios) < 0.8 and max(ratios) > 1.25 and all(0.45 <= r <= 2.2 for r in ratios)
        assert all(abs(s["crop"].shape[0] * s["crop"].shape[1] / 16 ** 2 - 1) < 0.15 for s in samples)
        for s in samples[::7]:
            x0, y0, x1, y1 = s["meta"]["box"]
            assert np.array_equal(s["crop"], photos[s["label"]][y0:y1, x0:x1])  # 1:1 pixels, the box's shape
    train_right = max(s["meta"]["box"][2] for s in read_shards(d, "train") if s["label"] == 0)
    assert train_right <= demo.split_bounds(photos[0].shape[1], 0.2)[0]


def test_demo_is_reproducible_and_reused(tmp_path, demo_dir):
    again = build_demo_shards(tmp_path / "a", seed=0, **SMALL)
    assert again.name == demo_dir.name
    for path in sorted(demo_dir.iterdir()):
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    other = build_demo_shards(tmp_path / "a", seed=1, **SMALL)
    assert other != again
    assert [s["meta"]["box"] for s in read_shards(other, "val")] != [s["meta"]["box"] for s in read_shards(again, "val")]
    stamp = (again / "manifest.json").stat().st_mtime_ns
    assert build_demo_shards(tmp_path / "a", seed=0, **SMALL) == again
    assert (again / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_demo_build_is_atomic(tmp_path, monkeypatch):
    def crash(out, spec):
        (out / "train-000000.tar").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_build_into", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo_shards(tmp_path, **SMALL)
    assert list((tmp_path / "demo").iterdir()) == []  # no final directory, no temp leftovers


# ---------------------------------------------------------------- transforms


def test_transforms():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    assert resize_shorter(img, 12).size == (20, 12)
    assert center_crop(img, 30).size == (30, 30)
    x = to_tensor(img)
    assert x.shape == (3, 30, 50) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)), np.asarray(img))
    out = ImageTransform(16, random_crop=True, random_flip=True)
    import random
    assert torch.equal(out(img, random.Random(3)), out(img, random.Random(3)))
    with pytest.raises(ValueError, match="rng"):
        out(img)
    for seed in range(20):  # the fast path (region export, flip before crop) = PIL's crop then flip
        rng = random.Random(seed)
        expected = random_hflip(random_crop(resize_shorter(img, 16), 16, rng), rng)
        assert np.array_equal(out.pixels(img, random.Random(seed)), np.asarray(expected))


# ---------------------------------------------------------------- DataModules


def test_demo_datamodule_batches(demo_dir):
    # batch 10: each of the 2 workers holds 2 shards of 50 = exactly its 10 batches, so the epoch is exact
    source = DemoShards(data_dir=str(demo_dir.parent.parent), seed=0, **SMALL)
    dm = ShardDataModule(source=source, decoder=ImageDecoder(SMALL["crop_size"]), batch_size=10, num_workers=2)
    assert dm.root == str(demo_dir) and dm.num_classes == 10 and dm.class_names == class_names()
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    train = list(loader)  # num_workers=2
    assert len(train) == len(loader) == 200 // 10
    b = train[0]
    assert b["image"].shape == (10, 3, 16, 16) and b["image"].dtype == torch.float32
    assert -1 <= b["image"].min() < b["image"].max() <= 1
    assert b["label"].dtype == torch.int64 and b["label"].shape == (10,) and 0 <= b["label"].min()
    assert all(isinstance(k, str) for k in b["key"]) and len(b["key"]) == 10
    keys = [k for b in train for k in b["key"]]
    assert len(set(keys)) == len(keys) == 200  # exact epoch over even shards: every sample once
    assert [k for b in loader for k in b["key"]] != keys  # the next epoch reshuffles
    val1, val2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(val1) == len(val2) == 6
    assert [b["key"] for b in val1] == [b["key"] for b in val2]
    assert all(torch.equal(a["image"], c["image"]) for a, c in zip(val1, val2))
    assert {k for b in val1 for k in b["key"]} == {s["key"] for s in read_shards(demo_dir, "val")}


def test_brace_urls_and_clear_errors(demo_dir, tmp_path):
    dm = image_module(str(demo_dir / "train-{000000..000003}.tar"), [str(demo_dir / "val-00000[01].tar")],
                              batch_size=16, num_workers=0, image_size=8, random_crop=True)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (16, 3, 8, 8) and dm.num_classes == 10
    with pytest.raises(FileNotFoundError, match=r"no shards match .*nowhere.*brace expansions"):
        image_module(str(tmp_path / "nowhere-{000000..000003}.tar")).setup("fit")
    with pytest.raises(FileNotFoundError, match="1 of 5 shards"):
        expand_urls(str(demo_dir / "train-{000000..000004}.tar"))
    bad = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(bad), encoder=False) as sink:
        sink.write({"__key__": "orphan", "cls": b"3"})
    with pytest.raises(BadSamplesError, match=r"sample 'orphan' in shard '.*bad-000000.tar' has no image"):
        next(iter(image_module(str(bad), batch_size=1, num_workers=0).make_train_set()))


# ---------------------------------------------------------------- equal batches on every rank


def write_uneven_shards(directory: Path, sizes: list[int]) -> str:
    """Shards with `sizes` samples of 8×8 PNGs, no manifest (so samples are counted from tar headers)."""
    rng = np.random.default_rng(0)
    for i, n in enumerate(sizes):
        with wds.TarWriter(str(directory / f"u-{i:06d}.tar"), encoder=False) as sink:
            for j in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"s{i}_{j}", "png": buf.getvalue(), "cls": str(i).encode()})
    return str(directory / f"u-{{000000..{len(sizes) - 1:06d}}}.tar")


def test_slot_shards_split_like_webdataset():
    urls = ["a", "b", "c"]
    assert slot_shards(urls, 0, 2, 0, 1) == ["a", "c"] and slot_shards(urls, 1, 2, 0, 1) == ["b"]
    # 2 ranks × 2 workers = 4 slots over 3 shards: the last slot reuses a shard instead of going empty
    assert [slot_shards(urls, r, 2, w, 2) for r in (0, 1) for w in (0, 1)] == [["a"], ["c"], ["b"], ["a"]]


@pytest.mark.parametrize("samples_per_epoch", [None, 20])
def test_every_rank_gets_equal_batches_from_uneven_shards(tmp_path, samples_per_epoch):
    urls = write_uneven_shards(tmp_path, [10, 3, 1])
    assert count_samples(expand_urls(urls)) == 14  # no manifest here: counted from the tar headers
    dm = image_module(urls, urls, batch_size=2, image_size=8, samples_per_epoch=samples_per_epoch,
                              shuffle_buffer=4)
    expected = (samples_per_epoch or 14) // (2 * 2)
    for num_workers in (0, 2):
        for make, n in ((dm.make_train_set, expected), (dm.make_val_set, 4)):  # val: ceil(ceil(14/2)/2)
            counts = []
            for rank in (0, 1):
                stream = make(rank=rank, world_size=2)
                batches = list(EpochLoader(stream, num_workers=num_workers))
                assert all(b["image"].shape == (2, 3, 8, 8) for b in batches)
                counts.append(len(batches))
            assert counts == [n, n], (make.__name__, num_workers, counts)


def test_val_split_covers_every_sample_once_across_ranks(tmp_path):
    urls = write_uneven_shards(tmp_path, [10, 3, 1])
    dm = image_module(urls, urls, batch_size=7, image_size=8)
    keys = [[k for b in EpochLoader(dm.make_val_set(r, 2), num_workers=2) for k in b["key"]] for r in (0, 1)]
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 14
    assert isinstance(dm.make_val_set(0, 2), ShardStream)
