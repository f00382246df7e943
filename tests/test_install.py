"""A non-editable install (`pip install .`) works from any directory: the entry points find the config tree as
package data of the installed `ldmlab`, not through the checkout; machine overrides (conf/local) never ship in
the wheel and come from `--config-dir` instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_data_dir

# git-ignored in the checkout: a machine's own overrides, which a wheel built there must not carry
POISON = "# @package _global_\ntags: [from_the_source_tree]\n"
LOCAL = "# @package _global_\ntags: [from_config_dir]\n"


def copy_checkout(dst: Path) -> Path:
    """The files a fresh clone (plus uncommitted work) has: tracked and untracked, not ignored."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, text=True, check=False)
    if listed.returncode != 0:  # not a git checkout: everything but the usual build and run outputs
        shutil.copytree(REPO, dst, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "outputs", "*.egg-info", "__pycache__", ".pytest_cache", "local"))
        return dst
    for name in filter(None, listed.stdout.split("\0")):
        src = REPO / name
        if src.is_file() or src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name, follow_symlinks=False)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`pip install --target` of a copy of the checkout (offline: no index, no build isolation)."""
    root = tmp_path_factory.mktemp("install")
    src = copy_checkout(root / "src")
    (src / "src/ldmlab/conf/local").mkdir(parents=True, exist_ok=True)
    (src / "src/ldmlab/conf/local/default.yaml").write_text(POISON)
    site = root / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(site), str(src)], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (root / "elsewhere").mkdir()
    (root / "confdir/local").mkdir(parents=True)
    (root / "confdir/local/default.yaml").write_text(LOCAL)
    return {"src": src, "site": site, "cwd": root / "elsewhere", "confdir": root / "confdir"}


def run(installed: dict[str, Path], *args: str, timeout: float = 300) -> subprocess.Popen:
    """`python <args>` from a directory outside the checkout, with only the install on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LDMLAB_CONF")}
    env.update(PYTHONPATH=str(installed["site"]), WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *args], cwd=installed["cwd"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def output(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
def test_installed_package_runs_its_entry_points_from_another_directory(installed: dict[str, Path]) -> None:
    site, src = installed["site"], installed["src"]
    assert (site / "ldmlab/conf/train.yaml").is_file() and (site / "ldmlab/conf/model/diffusion/noise_schedule").is_dir()
    assert not (site / "ldmlab/conf/local/default.yaml").exists()  # the machine override stayed home
    helps = {  # all four at once: each mostly imports torch
        "train": run(installed, str(src / "train.py"), "--help"),
        "sample": run(installed, str(src / "sample.py"), "--help"),
        "pipeline": run(installed, "-m", "ldmlab.pipeline", "--help"),
        "cache_latents": run(installed, "-m", "ldmlab.cache_latents", "--help"),
        "where": run(installed, "-c", "import ldmlab, ldmlab.configs; print(ldmlab.__file__); "
                                      "print(ldmlab.configs.CONF_DIR)"),
    }
    texts = {name: output(proc) for name, proc in helps.items()}
    assert texts["where"].split() == [str(site / "ldmlab/__init__.py"), str(site / "ldmlab/conf")]
    assert "unet_sd15" in texts["train"] and "== Config ==" in texts["train"]
    assert "sample is powered by Hydra" in texts["sample"]
    assert "pipeline=demo|demo_gpu" in texts["pipeline"]
    assert "splits" in texts["cache_latents"]

    run_dir = installed["cwd"] / "run"
    output(run(installed, str(src / "train.py"), "--config-dir", str(installed["confdir"]), "trainer.max_steps=2",
               "model.loss.perceptual_weight=0", "data.batch_size=4", "data.num_workers=0",
               "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
               f"paths.root_dir={installed['cwd']}", f"paths.data_dir={shared_data_dir()}",
               f"hydra.run.dir={run_dir}"))
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # conf/local of --config-dir applies; the one in the source tree was neither installed nor read
    assert "from_config_dir" in (run_dir / ".hydra/config.yaml").read_text()
