"""make_shards: folder / JSONL → shards + manifest → wds loader → a training step; images, labels intact."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from PIL import Image

from ldmlab.data.decoders import ImageDecoder
from ldmlab.data.make_shards import main as make_shards_main
from ldmlab.data.module import ShardDataModule
from ldmlab.data.transforms import to_tensor
from ldmlab.lit.vae import VAEModule
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.discriminator import NLayerDiscriminator

CLASSES = ["ant", "bee", "cow"]


def image_folder(root: Path, per_class: int = 8, size: tuple[int, int] = (16, 16)) -> dict[str, np.ndarray]:
    """Class folders of random PNGs with same-name captions; returns {relative path: pixels}."""
    rng = np.random.default_rng(0)
    pixels = {}
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img.{i}.png")
            (root / c / f"img.{i}.txt").write_text(f"a photo of {c} {i}\n")
            pixels[f"{c}/img.{i}.png"] = arr
    return pixels


def test_folder_round_trips_through_the_loader_and_a_training_step(tmp_path):
    pixels = image_folder(tmp_path / "src")
    (tmp_path / "src" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "max_count=5",
                            "val_fraction=0.25"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"] == {"train": {"samples": 18, "shards": 4}, "val": {"samples": 6, "shards": 2}}
    assert manifest["counts"]["train-000003.tar"] == 3 and manifest["skipped"] == 1
    assert "broken.jpg" in manifest["skipped_examples"][0]
    assert json.loads((out / "classes.json").read_text()) == CLASSES

    dm = ShardDataModule(root=str(out), decoder=ImageDecoder(16, random_flip=False), batch_size=6, num_workers=0)
    dm.setup("fit")
    seen = {}
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for b in loader:
            for img, label, text in zip(b["image"], b["label"], b["text"]):
                c, i = text.split()[-2:]
                assert torch.equal(img, to_tensor(Image.fromarray(pixels[f"{c}/img.{i}.png"])))  # lossless
                assert CLASSES[label] == c
                seen[text] = True
    assert len(seen) == 24 and dm.num_classes == 3

    torch.manual_seed(0)
    module = VAEModule(AutoencoderKL(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4),
                       NLayerDiscriminator(base_channels=8, n_layers=2), loss={"perceptual_weight": 0.0})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, val_check_interval=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and "val/psnr" in trainer.callback_metrics


def test_jsonl_resize_and_byte_limited_shards(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for i in range(10):
        pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
        row = {"image": f"{i}.jpg", "caption": f"caption {i}", "source": "test"}
        row.update({"class": ["x", "y"][i % 2]} if i < 8 else {"label": 5})
        lines.append(json.dumps(row))
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    out = make_shards_main([f"src={tmp_path / 'list.jsonl'}", f"out={tmp_path / 'out'}", "resize=20",
                            "format=webp", "max_count=null", "max_bytes=6K", "workers=2", "shuffle=false"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 10 and len(manifest["counts"]) > 1
    samples = [s for p in sorted(out.glob("train-*.tar")) for s in wds.tarfile_samples([{"url": str(p)}])]
    assert [s["txt"].decode() for s in samples] == [f"caption {i}" for i in range(10)]  # shuffle=false
    assert [int(s["cls"]) for s in samples] == [0, 1] * 4 + [5, 5]
    for s in samples:
        assert Image.open(io.BytesIO(s["webp"])).size == (30, 20)  # shorter side 40 → 20, aspect kept
        assert json.loads(s["json"])["source"] == "test"
    for path in out.glob("train-*.tar"):
        with tarfile.open(path) as tar:
            members = len({m.name.split(".")[0] for m in tar})
        assert path.stat().st_size <= 6000 + 10240 or members == 1  # tar pads files to 10 KiB records


def test_clear_errors(tmp_path, capsys):
    image_folder(tmp_path / "src", per_class=1)
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "loose.png")
    with pytest.raises(SystemExit, match=r"class subfolders but also images at its top level \(loose.png\)"):
        make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'o'}"])
    (tmp_path / "src" / "loose.png").unlink()
    make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="already holds shards: pass overwrite=true"):
        make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'o'}"])
    with pytest.raises(SystemExit, match="Key 'shard_size' not in 'MakeShardsArgs'; see --help"):
        make_shards_main([f"src={tmp_path / 'src'}", "out=x", "shard_size=3"])
    with pytest.raises(SystemExit, match=r"missing required argument\(s\) out=..."):
        make_shards_main([f"src={tmp_path / 'src'}"])
