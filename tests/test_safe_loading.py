"""Loading never runs code from a file: a pickle whose `__reduce__` calls os.system is refused everywhere.

The crafted file would `touch` a marker if unpickled; each test asserts a one-line refusal naming the file
and that the marker does not exist afterwards. `test_the_crafted_file_really_runs_code` shows the file is
live (an unsafe load does create the marker), so a loader that unpickled it would fail these tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_train

from ldmlab.nn.safe_load import UnsafeCheckpointError, load_weights_only

UNSAFE_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # flips torch.load's *default* to unsafe


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(a checkpoint-shaped pickle with a code payload, the marker it would create)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": Payload(marker)}, path)
    return path, marker


def assert_refused(error: object, path: Path, marker: Path) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert f"{path} is not a weights-only checkpoint: refusing to unpickle code" in message
    assert "posix.system" in message and "only if you trust it" in message
    assert not marker.exists(), "the payload ran"


def run_fails(args: list[str], cwd: Path | None = None) -> str:
    """Run `python <args>` with torch's unsafe default forced on; it must fail without a traceback: its stderr."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, check=False,
                          env={**os.environ, **UNSAFE_ENV, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_the_crafted_file_really_runs_code(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("mmap", [False, True])
def test_shared_loader_refuses(evil: tuple[Path, Path], mmap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(*next(iter(UNSAFE_ENV.items())))
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights_only(path, mmap=mmap)
    assert_refused(info.value, path, marker)


def test_shared_loader_reads_plain_weights(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(load_weights_only(tmp_path / "ok.pt")["w"], torch.arange(3))


def test_read_state_dict_and_load_vae(evil: tuple[Path, Path]) -> None:
    from ldmlab.convert.load import load_vae, read_state_dict

    path, marker = evil
    for load in (read_state_dict, load_vae):
        with pytest.raises(UnsafeCheckpointError) as info:
            load(path)
        assert_refused(info.value, path, marker)


def test_convert_cli(evil: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = evil
    stderr = run_fails(["-m", "ldmlab.convert", "--from", "sd", "--to", "ldmlab", "--vae", str(path), "--out",
                        str(tmp_path / "out")])
    assert_refused(stderr.strip(), path, marker)


def test_unet_init(evil: tuple[Path, Path]) -> None:
    from ldmlab.lit.weights import load_unet_init
    from ldmlab.nn.unet import UNetModel

    path, marker = evil
    unet = UNetModel(model_channels=32, channel_mult=(1,), attention_levels=(), num_heads=4, context_dim=None,
                     norm_groups=8)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_unet_init(unet, str(path))
    assert_refused(info.value, path, marker)


def test_lpips_backbone_and_heads(evil: tuple[Path, Path]) -> None:
    from ldmlab.nn.lpips import LPIPS

    path, marker = evil
    for kwargs in ({"backbone": path}, {"heads": path}):
        with pytest.raises(UnsafeCheckpointError) as info:
            LPIPS(**kwargs)
        assert_refused(info.value, path, marker)


def test_sample_load_ldm_and_sample_py(evil: tuple[Path, Path], tmp_path: Path) -> None:
    from ldmlab.sample import load_ldm

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as info:
        load_ldm(path)
    assert_refused(info.value, path, marker)
    stderr = run_fails([str(REPO / "sample.py"), f"ckpt={path}", f"out={tmp_path}/g.png"])
    line = next(line for line in stderr.splitlines() if line.startswith("ckpt: "))
    assert_refused(line.removeprefix("ckpt: "), path, marker)
    assert not (tmp_path / "g.png").exists()


def test_cache_latents_vae(evil: tuple[Path, Path], tmp_path: Path) -> None:
    from ldmlab.cache_latents import main
    from ldmlab.validate import ConfigError

    path, marker = evil
    with pytest.raises(ConfigError) as info:
        main([f"vae={path}", f"out={tmp_path / 'cache'}", f"paths.root_dir={tmp_path}"])
    assert_refused(str(info.value).removeprefix("vae: "), path, marker)
    assert not (tmp_path / "cache").exists()  # refused before Fabric, data or output dir


def test_ldm_vae_path_is_checked_before_the_run(evil: tuple[Path, Path], tmp_path: Path) -> None:
    from ldmlab.validate import check_config

    path, marker = evil
    found = check_config(compose_train(["model=unet_small", f"model.vae.path={path}"], tmp_path))
    assert_refused(next(p for p in found if p.startswith("model.vae.path: ")).removeprefix("model.vae.path: "),
                   path, marker)


def test_resume_checkpoint_is_refused_before_anything_runs(evil: tuple[Path, Path], tmp_path: Path) -> None:
    """`train.py ckpt_path=evil.ckpt`: one line on stderr, no run output, no demo shards built, payload not run."""
    path, marker = evil
    data = tmp_path / "data"
    stderr = run_fails([str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={data}",
                        f"ckpt_path={path}"], cwd=tmp_path)
    line = next(line for line in stderr.splitlines() if line.startswith("ckpt_path: "))
    assert_refused(line.removeprefix("ckpt_path: "), path, marker)
    assert not data.exists() and not list(tmp_path.rglob("last.ckpt"))


@pytest.mark.slow
def test_lightning_resume_itself_is_weights_only(evil: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With the config check bypassed (e.g. a SLURM `hpc` resume), trainer.fit's own load still refuses code."""
    import pickle

    import ldmlab.run

    path, marker = evil
    monkeypatch.setenv(*next(iter(UNSAFE_ENV.items())))
    monkeypatch.setattr(ldmlab.run, "validate_config", lambda cfg: None)
    cfg = compose_train([f"ckpt_path={path}", "trainer.max_steps=1", "trainer.num_sanity_val_steps=0",
                         "trainer.limit_val_batches=0", "data.num_workers=0", "data.batch_size=2",
                         "trainer.enable_progress_bar=false", "callbacks=none"], tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ldmlab.run.train(cfg)
    assert not marker.exists(), "Lightning unpickled the payload"
