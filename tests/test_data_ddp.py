"""Real 2-process gloo DDP: equal batch counts over deliberately uneven shards (so training does not hang) in
both epoch modes, and cache_latents split over two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import io, json, sys
    import numpy as np, pytorch_lightning as pl, torch, webdataset as wds
    from PIL import Image
    from ldmlab.data import ImageDecoder, ShardDataModule

    out, samples_per_epoch = sys.argv[1], (int(sys.argv[2]) or None)

    class Recorder(pl.LightningModule):
        """Records the keys of every batch it sees; the loss makes DDP all-reduce gradients each step."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.seen = {"train": [], "val": []}

        def training_step(self, batch, i):
            self.seen["train"].append([self.current_epoch, batch["key"]])
            return self.lin(batch["image"].mean((2, 3))).pow(2).mean()

        def validation_step(self, batch, i):
            self.seen["val"].append([self.current_epoch, batch["key"]])
            self.log("val_loss", self.lin(batch["image"].mean((2, 3))).mean(), sync_dist=True, batch_size=2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def on_fit_end(self):
            with open(f"{out}/rank{self.global_rank}.json", "w") as f:
                json.dump(self.seen, f)

    if __name__ == "__main__":
        rng = np.random.default_rng(0)
        for i, n in enumerate([10, 3, 1]):  # uneven on purpose: 10 + 3 + 1 samples over 2 ranks
            path = f"{out}/u-{i:06d}.tar"
            with wds.TarWriter(path, encoder=False, mtime=0.0) as sink:
                for j in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
                    sink.write({"__key__": f"s{i}_{j}", "png": buf.getvalue(), "cls": str(i).encode()})
        urls = f"{out}/u-{{000000..000002}}.tar"
        dm = ShardDataModule(urls, urls, decoder=ImageDecoder(8), batch_size=2, num_workers=1,
                             samples_per_epoch=samples_per_epoch, shuffle_buffer=4)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0)
        trainer.fit(Recorder(), datamodule=dm)
''')


@pytest.mark.slow
@pytest.mark.parametrize("samples_per_epoch", [0, 12])
def test_ddp_ranks_get_equal_batches(tmp_path: Path, samples_per_epoch: int):
    (tmp_path / "train_ddp.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "train_ddp.py", str(tmp_path), str(samples_per_epoch)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_epoch = (samples_per_epoch or 14) // (2 * 2)  # samples // (world size · batch size)
    for rank in seen:
        assert [e for e, _ in rank["train"]] == [0] * per_epoch + [1] * per_epoch
        assert [e for e, _ in rank["val"]] == [0] * 4 + [1] * 4  # ceil(ceil(14 / 2) / 2)
        assert [k for _, k in rank["val"][:4]] == [k for _, k in rank["val"][4:]]  # deterministic validation
        epochs = [[k for e, keys in rank["train"] if e == epoch for k in keys] for epoch in (0, 1)]
        assert epochs[0] != epochs[1]  # the trainer's epoch reseeds the shard order and shuffle
    val_keys = [{k for _, keys in rank["val"] for k in keys} for rank in seen]
    assert not val_keys[0] & val_keys[1] and len(val_keys[0] | val_keys[1]) == 14


@pytest.mark.slow
def test_cache_latents_on_two_ranks_matches_one(tmp_path: Path):
    """`python -m ldmlab.cache_latents trainer=ddp` (2 gloo ranks) writes the shards one process writes."""
    import numpy as np
    from test_cache_latents import make_setup, run_cache

    from ldmlab.data.latents import load_npy
    from ldmlab.data.tarstream import shard_samples

    (tmp_path / "cache").mkdir()
    setup = make_setup(tmp_path / "cache")
    one = run_cache(setup, tmp_path / "one")
    cmd = [sys.executable, "-m", "ldmlab.cache_latents", f"vae={setup['vae_path']}", f"out={tmp_path / 'two'}",
           "data=wds", f"data.root={setup['shards']}", "data.decoder.image_size=16", "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "batch_size=3",
           "num_workers=1", f"paths.root_dir={tmp_path}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: encoded 3 shards" in proc.stderr and "rank 1: encoded 2 shards" in proc.stderr
    names = sorted(p.name for p in one.glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.tar")) and len(names) == 5
    for name in names:  # equal up to fp16 rounding (thread counts change float summation order)
        a, b = (list(shard_samples(str(d / name))) for d in (one, tmp_path / "two"))
        meta = [[(s["__key__"], s["cls"], s["txt"]) for s in samples] for samples in (a, b)]
        assert meta[0] == meta[1]
        for x, y in zip(a, b):
            for field in ("mean.npy", "std.npy"):
                np.testing.assert_allclose(load_npy(x[field]), load_npy(y[field]), rtol=2e-3, atol=1e-4)
    assert json.loads((one / "manifest.json").read_text())["counts"] == \
        json.loads((tmp_path / "two" / "manifest.json").read_text())["counts"]

