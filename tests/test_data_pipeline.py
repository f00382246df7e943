"""The shard stream: exact epochs see every sample once across ranks × workers, sources mix by weight,
pipe: urls work, and bad samples (corrupt image, truncated tar, missing field) are skipped, counted, logged
and stop the run when there are too many."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO
from PIL import Image

from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.filters import BadSamplesError
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader
from ldmlab.data.shards import DataConfigError, expand_urls, segments, shard_name, sibling_url, wrapped

DECODER_KEYS = {f.name for f in dataclasses.fields(ImageDecoder) if f.init}


def image_module(*urls: object, **kw: object) -> ShardDataModule:
    """An image ShardDataModule from flat keywords: decoder keys go to its ImageDecoder, as in conf/data/wds.yaml."""
    decoder = ImageDecoder(**{k: kw.pop(k) for k in list(kw) if k in DECODER_KEYS})
    return ShardDataModule(*urls, decoder=decoder, **kw)


def png(value: int, size: int = 8) -> bytes:
    """A size×size PNG whose pixels all equal `value` (so the decoded batch says which sample it was)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(directory: Path, sizes: list[int], prefix: str = "s", label: int | None = None,
                 manifest: bool = False, **extra: bytes) -> str:
    """Shards of `sizes` samples (keys p{shard}_{i}, .png, .cls, .txt); returns the brace url pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for i, n in enumerate(sizes):
        name = f"{prefix}-{i:06d}.tar"
        with wds.TarWriter(str(directory / name), encoder=False) as sink:
            for j in range(n):
                sink.write({"__key__": f"{prefix}{i}_{j}", "png": png(j % 250),
                            "txt": f"caption {i} {j}".encode(),
                            "cls": str(i if label is None else label).encode(), **extra})
        counts[name] = n
    if manifest:
        (directory / "manifest.json").write_text(json.dumps({"counts": counts}))
    return str(directory / f"{prefix}-{{000000..{len(sizes) - 1:06d}}}.tar")


def epoch_keys(dm: ShardDataModule, world: int, workers: int) -> list[list[str]]:
    """Keys each rank sees in one training epoch (ranks simulated in-process, workers real)."""
    return [[k for b in EpochLoader(dm.make_train_set(r, world), num_workers=workers) for k in b["key"]]
            for r in range(world)]


def test_segments_and_wrapping():
    assert segments(["a", "b", "c"], [4, 4, 4], 2, 9) == [("a", 2, 4), ("b", 0, 4), ("c", 0, 1)]
    assert wrapped(10, 13, 0, 7) == [(10, 13), (10, 13), (10, 11)]
    assert shard_name("pipe:aws s3 cp s3://bkt/ds/train-000001.tar -") == "train-000001.tar"
    assert sibling_url("pipe:aws s3 cp s3://bkt/ds/train-000001.tar -", "manifest.json") == \
        "pipe:aws s3 cp s3://bkt/ds/manifest.json -"
    assert shard_name("https://host/ds/x-000002.tar?sig=1") == "x-000002.tar"


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 2)])
def test_exact_epoch_sees_every_sample_once_across_ranks_and_workers(tmp_path, world, workers):
    urls = write_shards(tmp_path, [12] * 6)  # 72 samples: 9 batches of 4 per rank for 2 ranks, 6 for 3
    dm = image_module(urls, batch_size=4, image_size=8, shuffle_buffer=8)
    epoch = epoch_keys(dm, world, workers)
    assert len({len(k) for k in epoch}) == 1  # the same number of batches on every rank
    every_sample = Counter(f"s{i}_{j}" for i in range(6) for j in range(12))
    assert Counter(k for keys in epoch for k in keys) == every_sample


def test_exact_epoch_over_uneven_shards_never_repeats(tmp_path):
    urls = write_shards(tmp_path, [13, 2, 7, 1, 9])  # 32 samples; batch 3 × 2 ranks: 5 batches each, 2 left out
    dm = image_module(urls, batch_size=3, image_size=8, shuffle_buffer=4)
    epoch = epoch_keys(dm, 2, 2)
    assert [len(k) for k in epoch] == [15, 15]
    assert len(set(epoch[0] + epoch[1])) == 30  # no sample twice; a different 2 are left out each epoch


def test_weighted_sources_mix_in_proportion(tmp_path):
    a = write_shards(tmp_path / "a", [50] * 4, prefix="a", label=0)
    b = write_shards(tmp_path / "b", [50] * 2, prefix="b", label=1)
    dm = image_module([a, b], weights=[0.8, 0.2], samples_per_epoch=800, batch_size=20, image_size=8,
                              shuffle_buffer=50, num_workers=0)
    labels = np.concatenate([b["label"].numpy() for b in EpochLoader(dm.make_train_set())])
    assert len(labels) == 800 and abs((labels == 0).mean() - 0.8) < 0.05
    with pytest.raises(ValueError, match="data.weights mix sources by sampling: set data.samples_per_epoch"):
        image_module([a, b], weights=[0.8, 0.2], image_size=8).make_train_set()
    with pytest.raises(ValueError, match="data.weights has 3 entries but data.train_urls has 2 sources"):
        image_module([a, b], weights=[1, 1, 1], samples_per_epoch=10).make_train_set()


def test_pipe_urls_with_manifest_counts(tmp_path):
    write_shards(tmp_path, [6, 6], manifest=True)
    urls = f"pipe:cat {tmp_path}/s-{{000000..000001}}.tar"
    assert expand_urls(urls) == [f"pipe:cat {tmp_path}/s-00000{i}.tar" for i in (0, 1)]
    dm = image_module(urls, urls, batch_size=3, image_size=8, num_workers=0)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 4 and sorted(k for b in train for k in b["key"]) == sorted(f"s{i}_{j}" for i in (0, 1)
                                                                                     for j in range(6))
    assert train[0]["text"][0].startswith("caption ") and len(list(dm.val_dataloader())) == 4
    with pytest.raises(ValueError, match=r"exact epochs need sample counts but shard 'pipe:cat .*nowhere.tar'"):
        image_module(f"pipe:cat {tmp_path}/nowhere.tar").make_train_set()


def test_fields_map_from_json_and_required(tmp_path):
    meta = json.dumps({"label": 7, "caption": "from json"}).encode()
    urls = write_shards(tmp_path, [4], json=meta)
    dm = image_module(urls, batch_size=4, image_size=8, label_key="json:label", text_key="json:caption",
                              required=["label", "text"], num_workers=0)
    b = next(iter(EpochLoader(dm.make_train_set())))
    assert b["label"].tolist() == [7] * 4 and b["text"] == ["from json"] * 4
    with pytest.raises(ValueError, match=r"data.decoder.required lists \['image'\]"):
        image_module(urls, required=["image"])


def test_under_a_trainer_pixels_travel_as_uint8_and_normalise_on_the_device(tmp_path):
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(tmp_path / "r-000000.tar"), encoder=False) as sink:
        for j in range(8):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"r{j}", "png": buf.getvalue(), "cls": b"1"})
    dm = image_module(str(tmp_path / "r-000000.tar"), batch_size=4, image_size=6, random_crop=True,
                              num_workers=0)
    floats = list(EpochLoader(dm.make_train_set()))  # no Trainer: float32 (B, 3, H, W) in [-1, 1]
    raw = list(EpochLoader(dm.make_train_set(on_device=True)))  # what setup() asks for under a Trainer
    assert raw[0]["image"].dtype == torch.uint8 and raw[0]["image"].shape == (4, 6, 6, 3)
    for f, r in zip(floats, raw, strict=True):
        image = dm.on_after_batch_transfer(r, 0)["image"]
        assert image.shape == (4, 3, 6, 6) and image.is_contiguous() and torch.equal(image, f["image"])


# ---------------------------------------------------------------- bad samples


def corrupt_shards(tmp_path: Path) -> tuple[str, int]:
    """3 shards of 10 (per the manifest): a corrupt .png in shard 0; shard 2 truncated after ~6 samples."""
    urls = write_shards(tmp_path, [10, 10, 10], manifest=True)
    with wds.TarWriter(str(tmp_path / "s-000000.tar"), encoder=False) as sink:
        for j in range(10):
            sink.write({"__key__": f"s0_{j}", "png": b"\x89PNG broken" if j == 3 else png(j), "cls": b"0"})
    data = (tmp_path / "s-000002.tar").read_bytes()
    (tmp_path / "s-000002.tar").write_bytes(data[:len(data) * 6 // 10])
    return urls, 30


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    urls, _ = corrupt_shards(tmp_path)
    dm = image_module(urls, batch_size=4, image_size=8, max_bad_fraction=0.5, num_workers=0)
    stream = dm.make_train_set()
    with caplog.at_level(logging.WARNING, logger="ldmlab.data"):
        batches = list(EpochLoader(stream))
    assert len(batches) == stream.batches_per_rank == 30 // 4  # refilled from the slot's own samples
    assert all(len(b["key"]) == 4 for b in batches)
    keys = {k for b in batches for k in b["key"]}
    assert "s0_3" not in keys and "s0_4" in keys
    counts = stream.counter.summary()
    assert counts["undecodable"] >= 1 and counts["shard"] >= 4  # the truncated shard's lost samples
    text = caplog.text
    assert "sample 's0_3' in shard" in text and ".png does not decode" in text
    assert "s-000002.tar' ended early" in text


def test_missing_field_names_key_and_shard(tmp_path, caplog):
    urls = write_shards(tmp_path, [5])
    with wds.TarWriter(str(tmp_path / "s-000000.tar"), encoder=False) as sink:  # sample 2 lost its .cls
        for j in range(5):
            sink.write({"__key__": f"s0_{j}", "png": png(j), **({} if j == 2 else {"cls": b"1"})})
    dm = image_module(urls, batch_size=2, image_size=8, required=["label"], max_bad_fraction=0.5,
                              num_workers=0)
    with caplog.at_level(logging.WARNING, logger="ldmlab.data"):
        keys = [k for b in EpochLoader(dm.make_train_set()) for k in b["key"]]
    assert "s0_2" not in keys and len(keys) == 4
    assert re.search(r"sample 's0_2' in shard '.*s-000000.tar' has no 'cls' field", caplog.text)
    # every sample without it: the run stops, naming the field and the shard
    dm = image_module(urls, batch_size=2, image_size=8, label_key="json:label", required=["label"],
                              num_workers=2, bad_check_after=20)
    stop = r"(?s)samples bad.*in shard '.*s-000000.tar' has no 'json:label' field"
    with pytest.raises(BadSamplesError, match=stop):
        next(iter(EpochLoader(dm.make_train_set(), num_workers=2)))


def test_too_many_bad_samples_stop_the_run(tmp_path):
    urls, _ = corrupt_shards(tmp_path)
    dm = image_module(urls, batch_size=2, image_size=8, max_bad_fraction=0.05, bad_check_after=10,
                              num_workers=0)
    with pytest.raises(BadSamplesError, match=r"samples bad .* more than data.max_bad_fraction=0.05; first: "):
        list(EpochLoader(dm.make_train_set()))


def test_a_truncated_shard_that_loses_many_samples_is_named(tmp_path, caplog):
    """One event losing 14 samples is logged with its shard (the log limit counts events, not samples)."""
    urls = write_shards(tmp_path, [20, 20], manifest=True)
    data = (tmp_path / "s-000001.tar").read_bytes()
    (tmp_path / "s-000001.tar").write_bytes(data[:len(data) * 3 // 10])  # ~6 of its 20 samples remain
    dm = image_module(urls, batch_size=4, image_size=8, max_bad_fraction=0.9, num_workers=0)
    stream = dm.make_train_set()
    with caplog.at_level(logging.WARNING, logger="ldmlab.data"):
        list(EpochLoader(stream))
    assert stream.counter.summary()["shard"] > 5
    assert re.search(r"skipped \d+ samples: shard '.*s-000001.tar' ended early", caplog.text)


# ---------------------------------------------------------------- empty shards


def empty_tar(path: Path) -> Path:
    """A valid tar with no member (what an interrupted writer or `tar cf x.tar -T /dev/null` leaves)."""
    with tarfile.open(path, "w"):
        pass
    return path


def test_empty_shards_are_named_at_setup(tmp_path, caplog):
    empty = empty_tar(tmp_path / "e-000000.tar")
    (tmp_path / "e-000001.tar").write_bytes(b"")  # 0 bytes
    urls = str(tmp_path / "e-{000000..000001}.tar")
    line = (r"^data.train_urls: 2 of 2 training shards hold no samples \('.*e-000000.tar', '.*e-000001.tar': "
            r"empty or not a tar file\): remove them from data.train_urls, or rewrite them with .*make_shards$")
    with pytest.raises(DataConfigError, match=line):
        image_module(urls, num_workers=0).setup("fit")
    # resampled epochs never count samples: they name the 0-byte files
    resampled = image_module(str(tmp_path / "e-000001.tar"), samples_per_epoch=8, batch_size=4, num_workers=0)
    with pytest.raises(DataConfigError, match=r"1 of 1 training shards hold no samples \('.*e-000001.tar'"):
        resampled.setup("fit")
    good = write_shards(tmp_path / "good", [8])
    dm = image_module([good, str(empty)], batch_size=4, image_size=8, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="ldmlab.data"):
        dm.setup("fit")  # some shards empty: a warning naming them, training goes on
    assert "1 of 2 training shards hold no samples ('" + str(empty) in caplog.text
    assert len(list(dm.train_dataloader())) == 2


@pytest.mark.slow
def test_train_py_names_an_empty_shard_in_one_line(tmp_path):
    """`python train.py data=wds data.train_urls=<empty tar>`: the error names the file and the fix, no traceback."""
    empty = empty_tar(tmp_path / "x-000000.tar")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(REPO / "train.py"), "data=wds", f"data.train_urls={empty}",
           f"paths.root_dir={tmp_path}", "trainer.max_steps=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1
    line = (f"data.train_urls: 1 of 1 training shards hold no samples ('{empty}': empty or not a tar file): "
            "remove them from data.train_urls, or rewrite them with python -m ldmlab.data.make_shards")
    assert line in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and "lower data.batch_size" not in proc.stderr
