"""cache_latents → latent shards → data=wds_latents: the VAE's posterior (fp16), labels and captions survive;
a second run skips finished shards; a different setup into the same directory is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

from ldmlab.cache_latents import main as cache_main
from ldmlab.data.decoders import open_image
from ldmlab.data.latents import LatentDecoder, load_npy
from ldmlab.data.make_shards import main as make_shards_main
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader
from ldmlab.data.transforms import ImageTransform
from ldmlab.nn.autoencoder import AutoencoderKL


def make_setup(tmp: Path) -> dict:
    """Image shards (3 classes × 6 captioned 16×20 PNGs; 4 train + 1 val shard) and a random-init VAE export."""
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cow"):
        (tmp / "src" / c).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "src" / c / f"{i}.png")
            (tmp / "src" / c / f"{i}.txt").write_text(f"{c} number {i}")
    make_shards_main([f"src={tmp / 'src'}", f"out={tmp / 'shards'}", "max_count=4", "val_fraction=0.25"])
    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8).eval()
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    metadata = {"format": "ldmlab.vae", "config": json.dumps(vae.config)}
    save_file(state, str(tmp / "vae.safetensors"), metadata=metadata)
    return {"tmp": tmp, "shards": tmp / "shards", "vae": vae, "vae_path": tmp / "vae.safetensors"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_setup(tmp_path_factory.mktemp("cache"))


def run_cache(setup: dict, out: Path, *extra: str) -> Path:
    return cache_main([f"vae={setup['vae_path']}", f"out={out}", "data=wds", f"data.root={setup['shards']}",
                       "data.decoder.image_size=16", "trainer=cpu", "batch_size=3", "num_workers=0",
                       f"paths.root_dir={setup['tmp']}", *extra])


def reference(setup: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, int, str]]:
    """{key: (posterior mean, std, label, caption)} computed directly from the source shards."""
    out, transform = {}, ImageTransform(16)
    for path in sorted(setup["shards"].glob("*.tar")):
        for s in wds.tarfile_samples([{"url": str(path)}]):
            with torch.no_grad():
                post = setup["vae"].encode(transform(open_image(s))[None])
            out[s["__key__"]] = (post.mean[0], post.std[0], int(s["cls"]), s["txt"].decode())
    return out


def all_batches(dm: ShardDataModule) -> list[dict]:
    dm.setup("fit")
    return list(EpochLoader(dm.train_set)) + list(EpochLoader(dm.val_set))


def test_cached_latents_are_the_vae_posterior_with_labels_and_captions(setup, tmp_path):
    out = run_cache(setup, tmp_path / "lat")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["classes"] == ["ant", "bee", "cow"]
    assert manifest["splits"] == {"train": {"samples": 14, "shards": 4}, "val": {"samples": 4, "shards": 1}}
    ref = reference(setup)
    stored = {s["__key__"]: s for p in sorted(out.glob("*.tar"))
              for s in wds.tarfile_samples([{"url": str(p)}])}
    assert stored.keys() == ref.keys()
    for key, (mean, std, label, text) in ref.items():
        assert load_npy(stored[key]["mean.npy"]).dtype == np.float16
        torch.testing.assert_close(torch.from_numpy(load_npy(stored[key]["std.npy"])).float(), std,
                                   rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(load_npy(stored[key]["mean.npy"])).float(), mean,
                                   rtol=1e-3, atol=1e-4)

    # data=wds_latents: raw means with sample_posterior=false, mean + std·ε (seeded) otherwise
    kw = {"root": str(out), "batch_size": 1, "num_workers": 0, "shuffle_buffer": 0}
    batches = all_batches(ShardDataModule(decoder=LatentDecoder(sample_posterior=False), **kw))
    assert len(batches) == 18 and set(batches[0]) == {"latent", "label", "text", "key"}
    for b in batches:
        mean, std, label, text = ref[b["key"][0]]
        assert b["latent"].dtype == torch.float32 and b["latent"].shape == (1, 4, 8, 8)
        torch.testing.assert_close(b["latent"][0], mean, rtol=1e-3, atol=1e-4)
        assert b["label"].tolist() == [label] and b["text"] == [text]
    sampled = all_batches(ShardDataModule(decoder=LatentDecoder(sample_posterior=True), seed=3, **kw))
    again = all_batches(ShardDataModule(decoder=LatentDecoder(sample_posterior=True), seed=3, **kw))
    eps = torch.stack([(b["latent"][0] - ref[b["key"][0]][0]) / ref[b["key"][0]][1] for b in sampled])
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # ε ~ N(0, I)
    assert all(torch.equal(a["latent"], b["latent"]) for a, b in zip(sampled, again))


def test_resume_skips_finished_shards_and_refuses_a_different_setup(setup, tmp_path, caplog):
    out = run_cache(setup, tmp_path / "lat", "sample=true", "splits=[train]")
    shards = sorted(out.glob("train-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    shards[1].unlink()
    (out / f".{shards[1].name}.tmp").write_bytes(b"half-written by a crashed run")
    with caplog.at_level(logging.INFO, logger="ldmlab.cache_latents"):
        run_cache(setup, out, "sample=true", "splits=[train]")
    assert "3 of 4 shards already cached; encoding 1" in caplog.text
    for p in shards:
        mtime, data = before[p.name]
        assert p.read_bytes() == data  # seeded samples: the re-encoded shard is byte-identical
        assert (p.stat().st_mtime_ns == mtime) == (p != shards[1])
    assert not (out / f".{shards[1].name}.tmp").exists()
    sample = next(iter(wds.tarfile_samples([{"url": str(shards[0])}])))
    assert "latent.npy" in sample and "mean.npy" not in sample
    refused = r"holds a cache made with different \['image_size'.*choose another out"
    with pytest.raises(ValueError, match=refused):
        run_cache(setup, out, "sample=true", "splits=[train]", "data.decoder.image_size=8")


def test_bucketed_cache_stores_each_latent_at_its_bucket_and_batches_by_bucket(setup, tmp_path):
    """Images of several aspect ratios: each latent is the VAE posterior of its bucket's centre crop, the
    manifest lists the buckets and their counts, and data=wds_latents batches one bucket at a time."""
    from ldmlab.data.buckets import nearest_bucket, parse_buckets
    from ldmlab.data.transforms import cover_crop, to_batch

    rng = np.random.default_rng(2)
    (tmp_path / "src").mkdir()
    shapes = [(16, 16), (12, 20), (20, 13), (18, 18), (10, 16), (24, 14)] * 2  # (H, W)
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    make_shards_main([f"src={tmp_path / 'src'}", f"out={tmp_path / 'shards'}", "max_count=5"])
    buckets = [[16, 16], [12, 20], [20, 12]]
    out = cache_main([f"vae={setup['vae_path']}", f"out={tmp_path / 'lat'}", "data=wds",
                      f"data.root={tmp_path / 'shards'}", "data.decoder.buckets=[[16,16],[12,20],[20,12]]",
                      "trainer=cpu", "batch_size=3", "num_workers=0", f"paths.root_dir={setup['tmp']}"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["buckets"] == [[4, 6, 10], [4, 8, 8], [4, 10, 6]]  # the VAE halves H and W
    assert sum(manifest["bucket_counts"]["train"]) == 12 and all(manifest["bucket_counts"]["train"])
    sizes = parse_buckets(buckets)
    for path in sorted(out.glob("*.tar")):
        for s in wds.tarfile_samples([{"url": str(path)}]):
            image = Image.open(tmp_path / "src" / f"{s['__key__']}.png").convert("RGB")
            size = sizes[nearest_bucket(sizes, image.height, image.width)]
            with torch.no_grad():
                mean = setup["vae"].encode(to_batch([cover_crop(image, size, None)[0]])).mean[0]
            torch.testing.assert_close(torch.from_numpy(load_npy(s["mean.npy"])).float(), mean,
                                       rtol=1e-3, atol=1e-3)

    dm = ShardDataModule(root=str(out), decoder=LatentDecoder(sample_posterior=False), batch_size=2,
                         num_workers=0, shuffle_buffer=0)
    dm.setup("fit")
    batches = list(EpochLoader(dm.train_set))
    assert len(batches) == 6 and {b["latent"].shape[1:] for b in batches} == {(4, 6, 10), (4, 8, 8), (4, 10, 6)}
    for b in batches:  # the micro-conditioning of the encoded crop travels with the latent
        for key, size, crop in zip(b["key"], b["original_size"].tolist(), b["crop_top_left"].tolist()):
            image = Image.open(tmp_path / "src" / f"{key}.png")
            assert size == [image.height, image.width] and crop[0] >= 0 and crop[1] >= 0

    # the config check sees every bucket's latent side: 6 and 10 do not divide by a 3-level U-Net's 4
    from conftest import compose_train

    from ldmlab.validate import check_config

    base = ["model=unet_small", f"model.vae.path={setup['vae_path']}", "data=wds_latents", f"data.root={out}"]
    assert not [p for p in check_config(compose_train(base, tmp_path)) if "latent side" in p]
    lines = [p for p in check_config(compose_train([*base, "model.unet.channel_mult=[1,2,2]"], tmp_path))
             if "latent side" in p]
    assert len(lines) == 1 and lines[0].startswith("model.unet.channel_mult=[1, 2, 2] downsamples H and W by 4, "
                                                   "but the cached latent side (the latent cache data.root=")
    assert "is 6, not a multiple of 4" in lines[0]
