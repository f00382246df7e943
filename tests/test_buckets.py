"""Aspect-ratio buckets (issue 21): generation and nearest-ratio assignment, the seeded schedule, the bounded
buffer, real shards of mixed sizes through the stream (one bucket per batch, the same bucket on every rank at
each step, equal batch counts over uneven shards), bit-exact resume with workers, the bad-input policies."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldmlab.data.buckets import (
    BucketBatcher,
    assign,
    bucket_schedule,
    make_buckets,
    nearest_bucket,
    parse_buckets,
)
from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.filters import BadSample
from ldmlab.data.make_shards import main as make_shards_main
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader
from ldmlab.data.shards import DataConfigError
from ldmlab.data.transforms import cover_crop

BUCKETS = [[16, 16], [8, 24], [24, 8], [16, 24], [24, 16]]  # (H, W)
# (H, W) of the images: square, wide, tall, 3:2 both ways, and one 3:1 beyond the widest bucket
SHAPES = [(20, 20), (11, 33), (30, 10), (18, 27), (27, 18), (12, 40)]


def mixed_shards(directory: Path, sizes: list[int]) -> str:
    """Shards of `sizes` PNGs of SHAPES in turn (keys b{shard}_{i}, a pixel value per key); the url pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        with wds.TarWriter(str(directory / f"b-{i:06d}.tar"), encoder=False, mtime=0.0) as sink:
            for j in range(n):
                h, w = SHAPES[(3 * i + j) % len(SHAPES)]
                rng = np.random.default_rng(100 * i + j)
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"b{i}_{j}", "png": buf.getvalue(), "cls": str(i).encode()})
    return str(directory / f"b-{{000000..{len(sizes) - 1:06d}}}.tar")


def bucket_module(urls: str, **kw: object) -> ShardDataModule:
    decoder = ImageDecoder(16, random_crop=True, random_flip=True, buckets=kw.pop("buckets", BUCKETS),
                           **{k: kw.pop(k) for k in ("small_images", "outside_ratio") if k in kw})
    return ShardDataModule(urls, decoder=decoder, **{"batch_size": 2, "shuffle_buffer": 4, "seed": 3, **kw})


# ---------------------------------------------------------------- buckets, assignment, schedule


def test_generated_buckets_are_multiples_of_the_step_near_the_area():
    buckets = make_buckets(512 * 512, 64, 2.0)
    assert buckets == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]  # SDXL-like, by H/W
    for area, step, ratio in [(1024 ** 2, 64, 4.0), (256 ** 2, 32, 2.5)]:
        for h, w in make_buckets(area, step, ratio):
            assert h % step == 0 and w % step == 0 and h * w <= area and max(h / w, w / h) <= ratio
            assert (h + step) * w > area  # the largest height for this width
    assert parse_buckets({"area": 512 * 512}) == buckets
    assert parse_buckets([[512, 512], [384, 640]]) == [(384, 640), (512, 512)]
    with pytest.raises(ValueError, match="data.decoder.buckets"):
        parse_buckets([[512]])


def test_nearest_aspect_ratio_by_log_distance_and_the_bad_input_policies():
    sizes = parse_buckets(BUCKETS)  # ratios 1/3, 2/3, 1, 3/2, 3
    assert sizes[nearest_bucket(sizes, 300, 451)] == (16, 24)  # chelsea 451×300: log-ratio nearest to 2/3
    assert sizes[nearest_bucket(sizes, 100, 190)] == (16, 24)  # 0.53: nearer 2/3 than 1/3 in log distance
    assert sizes[nearest_bucket(sizes, 100, 240)] == (8, 24)  # 0.42: nearer 1/3 in log distance (not linear)
    assert assign(sizes, 32, 48, "upscale", "nearest", "x") == (sizes.index((16, 24)), None)
    assert assign(sizes, 12, 18, "upscale", "nearest", "x") == (sizes.index((16, 24)), "upscaled")
    assert assign(sizes, 40, 200, "upscale", "nearest", "x") == (sizes.index((8, 24)), "outside_ratio")
    for args, match in [((12, 18, "skip", "nearest"), "smaller than its bucket 24×16 .*small_images=skip"),
                        ((40, 200, "upscale", "skip"), "outside the buckets' range .*outside_ratio=skip")]:
        with pytest.raises(BadSample, match=match) as error:
            assign(sizes, *args, "sample 'k'")
        assert error.value.kind == "shape"


def test_cover_crop_keeps_the_aspect_ratio_and_reports_the_offsets():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 60, 3), dtype=np.uint8))  # 60 wide, 30 high
    pixels, (top, left) = cover_crop(image, (16, 16), None)  # → 32×16, centre crop 16 wide at left 8
    assert pixels.shape == (16, 16, 3) and (top, left) == (0, 8)
    resized = np.asarray(image.resize((32, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(pixels, resized[:, 8:24])


def test_schedule_is_proportional_seeded_and_shared():
    steps = bucket_schedule([50, 30, 20, 0], 10, "0/1/buckets")
    assert Counter(steps) == {0: 5, 1: 3, 2: 2}
    assert steps == bucket_schedule([50, 30, 20, 0], 10, "0/1/buckets")  # a function of its arguments
    assert steps != bucket_schedule([50, 30, 20, 0], 10, "0/2/buckets")  # another epoch, another order
    assert sum(bucket_schedule([1, 1, 1], 7, "s").count(b) for b in range(3)) == 7


def test_batcher_borrows_the_nearest_bucket_only_when_its_buffer_is_full():
    sizes = parse_buckets(BUCKETS)
    b = BucketBatcher(sizes, batch_size=2, cap=4, reshapes=True)
    square, wide, widest = sizes.index((16, 16)), sizes.index((16, 24)), sizes.index((8, 24))
    for i, bucket in enumerate([widest, square, wide]):
        b.add(bucket, i)
    assert b.take(square) is None  # 3 pending < cap: wait for another square
    b.add(widest, 3)
    assert b.take(square) == (square, [1, 2])  # full: the square, then the nearest ratio (3:2), oldest first
    assert b.take(widest) == (widest, [0, 3])
    latents = BucketBatcher(sizes, batch_size=2, cap=2, reshapes=False)
    for i, bucket in enumerate([wide, wide, square]):
        latents.add(bucket, i)
    assert latents.take(widest) == (wide, [0, 1])  # cannot reshape: its fullest bucket, off the schedule


# ---------------------------------------------------------------- the stream over real shards


def test_two_ranks_agree_on_each_steps_bucket_over_uneven_shards(tmp_path):
    urls = mixed_shards(tmp_path, [17, 5, 2, 1])  # 25 samples, uneven on purpose
    dm = bucket_module(urls, num_workers=2)
    shapes, original = [], []
    for rank in (0, 1):
        batches = list(EpochLoader(dm.make_train_set(rank, 2), num_workers=2))
        assert len(batches) == 25 // (2 * 2)
        shapes.append([tuple(b["image"].shape[2:]) for b in batches])
        original += [tuple(s) for b in batches for s in b["original_size"].tolist()]
        for b in batches:
            h, w = b["image"].shape[2:]
            for (oh, ow), (top, left) in zip(b["original_size"].tolist(), b["crop_top_left"].tolist()):
                rh, rw = max(h, round(oh * max(h / oh, w / ow))), max(w, round(ow * max(h / oh, w / ow)))
                assert 0 <= top <= rh - h and 0 <= left <= rw - w  # inside the resized image
    assert shapes[0] == shapes[1] and len(set(shapes[0])) > 1  # one bucket per step, the same on both ranks
    assert set(original) <= set(SHAPES)


@pytest.mark.parametrize("samples_per_epoch", [None, 16])  # exact and resampled epochs
def test_stream_resumes_bit_exact_with_buckets_and_workers(tmp_path, samples_per_epoch):
    urls = mixed_shards(tmp_path, [9, 7, 4])

    def loader() -> EpochLoader:
        dm = bucket_module(urls, num_workers=2, bucket_buffer=2, samples_per_epoch=samples_per_epoch)
        return EpochLoader(dm.make_train_set(), num_workers=2)

    def take(ld: EpochLoader, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            out += list(ld)[:n - len(out)]
        return out

    per_epoch = len(loader())
    reference = take(loader(), 2 * per_epoch)
    for k in (1, 3, per_epoch + 2):
        first = loader()
        it, head = iter(first), []
        while len(head) < k:
            try:
                head.append(next(it))
            except StopIteration:
                it = iter(first)
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        tail = take(resumed, len(reference) - k)
        for got, want in zip(head + tail, reference):
            assert got["key"] == want["key"], f"resumed after {k}"
            for name in ("image", "original_size", "crop_top_left"):
                assert torch.equal(got[name], want[name]), f"{name} differs after resuming at {k}"


def test_small_and_outside_images_are_skipped_and_counted_when_configured(tmp_path):
    urls = mixed_shards(tmp_path, [12])
    kept = bucket_module(urls, buckets=[[24, 24], [16, 24], [24, 16]])  # 20×20 → 24×24: upscaled
    set_ = kept.make_train_set()
    list(EpochLoader(set_))
    summary = set_.counter.summary()
    assert summary["bad"] == 0 and summary["outside_ratio"] > 0 and summary["upscaled"] > 0
    skipping = bucket_module(urls, buckets=[[24, 24], [16, 24], [24, 16]], small_images="skip",
                             outside_ratio="skip", max_bad_fraction=1.0)
    set_ = skipping.make_train_set()
    list(EpochLoader(set_))
    summary = set_.counter.summary()
    assert summary["shape"] > 0 and summary["upscaled"] == summary["outside_ratio"] == 0
    with pytest.raises(DataConfigError, match="fits data.decoder.buckets"):
        bucket_module(urls, buckets=[[64, 64]], small_images="skip").make_train_set()  # all smaller: none usable


def test_unknown_policy_is_one_line():
    with pytest.raises(ValueError, match=r"data.decoder.small_images='grow' is unknown: valid are"):
        ImageDecoder(buckets=BUCKETS, small_images="grow")


def test_make_shards_images_keep_their_sizes_and_train_in_buckets(tmp_path):
    """make_shards (the real writer) keeps each image's aspect ratio; its shards batch by bucket."""
    rng = np.random.default_rng(1)
    (tmp_path / "src").mkdir()
    for i, (h, w) in enumerate(SHAPES * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "max_count=5"])
    dm = ShardDataModule(root=str(tmp_path / "shards"), decoder=ImageDecoder(buckets=BUCKETS), batch_size=2,
                         num_workers=0)
    batches = list(EpochLoader(dm.make_train_set()))
    assert len(batches) == 6 and all(math.prod(b["image"].shape[2:]) in (256, 192, 384) for b in batches)


DDP_SCRIPT = '''
import json, sys
import pytorch_lightning as pl, torch
from ldmlab.data import ImageDecoder, ShardDataModule

out, urls = sys.argv[1], sys.argv[2]
BUCKETS = json.loads(sys.argv[3])

class Recorder(pl.LightningModule):
    """Records (epoch, image shape) of every step; the loss makes DDP all-reduce gradients each step."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.seen = []

    def training_step(self, batch, i):
        self.seen.append([self.current_epoch, list(batch["image"].shape), batch["original_size"].tolist()])
        return self.lin(batch["image"].mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)

if __name__ == "__main__":
    decoder = ImageDecoder(16, random_crop=True, buckets=BUCKETS)
    dm = ShardDataModule(urls, decoder=decoder, batch_size=2, num_workers=2, shuffle_buffer=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recorder(), datamodule=dm)
'''


@pytest.mark.slow
def test_gloo_ranks_step_together_in_the_same_bucket_over_uneven_shards(tmp_path):
    """Two real DDP processes (gloo) under a Trainer: as many steps each, the same bucket at every step."""
    import json
    import os
    import subprocess
    import sys

    urls = mixed_shards(tmp_path / "shards", [17, 5, 2, 1])  # 25 samples, uneven
    (tmp_path / "train_ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "train_ddp.py", str(tmp_path), urls, json.dumps(BUCKETS)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [e for e, _, _ in seen[0]] == [0] * 6 + [1] * 6 == [e for e, _, _ in seen[1]]  # 25 // (2 · 2)
    shapes = [[(e, shape[2:]) for e, shape, _ in rank] for rank in seen]
    assert shapes[0] == shapes[1] and len({tuple(s) for _, s in shapes[0]}) > 1
    assert [o for _, _, o in seen[0]] != [o for _, _, o in seen[1]]  # different samples, same shapes


@pytest.mark.slow
def test_killed_run_with_buckets_resumes_bit_exact(tmp_path):
    """train.py (the tiny VAE) on mixed aspect ratios with buckets and 2 workers, SIGKILLed mid-epoch and
    restarted: its final checkpoint equals an uninterrupted run's bit for bit."""
    from test_resume import check_killed_run_resumes_exactly

    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i, (h, w) in enumerate([(40, 40), (30, 50), (50, 30), (36, 60), (60, 36)] * 8):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "max_count=7", "val_fraction=0.1"])
    check_killed_run_resumes_exactly(tmp_path, ["model=vae_tiny", "model.loss.perceptual_weight=0", "data=wds",
                                                f"data.root={tmp_path / 'shards'}", "data.batch_size=2",
                                                "data.num_workers=2", "data.decoder.random_crop=true",
                                                "data.decoder.buckets=[[32,32],[24,40],[40,24]]"])
