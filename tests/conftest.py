"""Shared test helpers: the repo root, Hydra composition of the real conf/ tree, subprocess runs of train.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see ldmlab/__init__.py

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import ldmlab.configs  # noqa: F401  # registers the resolvers conf/'s yaml files use (composed from a directory here)
from ldmlab.utils.stand_ins import make_tiny_clip


@pytest.fixture(autouse=True)
def _rank_zero_again() -> None:
    """A Trainer built under simulated SLURM ranks leaves Lightning's process-wide rank behind; every test starts
    as rank zero, as a fresh process would."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = fabric_rank_zero.rank = 0


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would, with paths redirected to tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        if "data_dir" not in " ".join(overrides):
            cfg.paths.data_dir = str(shared_data_dir())
    return cfg


def one(found: list[str], *needles: str) -> str:
    """The single problem line that mentions every needle (and is one line)."""
    hits = [p for p in found if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {found}"
    assert "\n" not in hits[0]
    return hits[0]


def shared_data_dir() -> Path:
    """One data dir for the whole session so the demo shards are built once, not per test."""
    path = Path(os.environ.get("LDMLAB_TEST_DATA", REPO / ".pytest_cache" / "ldmlab-data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_train(args: list[str], cwd: Path, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py <args>` in a subprocess with run dirs under cwd (in `env`, default this process's
    environment); fail with its output on error."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    flags = [a for a in args if a.startswith("-")]  # argparse wants -m/--help before the overrides
    cmd = [sys.executable, str(REPO / "train.py"), *flags, f"paths.root_dir={cwd}",
           f"paths.data_dir={shared_data_dir()}", *[a for a in args if not a.startswith("-")]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"train.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics.csv of a run dir."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[float]:
    """The logged values of one metric, in order."""
    return [float(r[key]) for r in rows if r.get(key)]


# A few steps of the tiny VAE with validation and checkpoints, as cheap as the loop allows.
TINY = ["model=vae_tiny", "debug=limit", "data.batch_size=4", "data.num_workers=0", "trainer.num_sanity_val_steps=0",
        "trainer.limit_val_batches=1"]


@pytest.fixture(scope="session")
def vae_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One `train.py -m` grid of TINY VAE runs, 2 KL weights × 2 learning rates, with logger=many (CSV, TensorBoard,
    W&B with no key, no ~/.netrc and no WANDB_MODE: the offline fallback); (sweep dir, the command's output).

    Shared: the sweep, logger and compare tests read the same four jobs instead of each launching a sweep.
    """
    cwd = tmp_path_factory.mktemp("vae_sweep")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    sweep = cwd / "grid"
    proc = run_train(["-m", *TINY, "model.loss.kl_weight=1e-6,1e-5", "optimizer.lr=2e-4,5e-4", "logger=many",
                      f"hydra.sweep.dir={sweep}"], cwd=cwd, env={**env, "HOME": str(cwd)})
    return sweep, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seeded 75-step `train.py model=vae_tiny` run on the demo photos, GAN on from step 50.

    Shared: the VAE tests inspect it, the LDM tests train on its exported weights. 75 steps of batch 16 halve the
    reconstruction loss (seed 0: 0.51 -> 0.24) and raise the validation PSNR by ~2 dB; a smaller batch is not
    cheaper per sample on 2 cores and is noisier.
    """
    cwd = tmp_path_factory.mktemp("vae_e2e")
    run_dir = cwd / "run"
    run_train(["model=vae_tiny", "trainer.max_steps=75", "trainer.val_check_interval=25",
               "trainer.limit_val_batches=4", "trainer.log_every_n_steps=3", "model.gan.disc_start=50",
               f"hydra.run.dir={run_dir}", "seed=0"], cwd=cwd)
    return run_dir


def make_tiny_vae_export(path: Path, embed_dim: int = 4) -> Path:
    """A random small AutoencoderKL (f4) exported as ldmlab's vae.safetensors."""
    import json

    import torch
    from safetensors.torch import save_file

    from ldmlab.nn.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                        z_channels=embed_dim, embed_dim=embed_dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), str(path), metadata={"format": "ldmlab.vae", "config": json.dumps(vae.config)})
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-ins for the weights a real run reads from disk: a random VAE export and random CLIP encoders."""
    root = tmp_path_factory.mktemp("assets")
    return {"vae": make_tiny_vae_export(root / "vae.safetensors"), "clip32": make_tiny_clip(root / "clip32"),
            "clip768": make_tiny_clip(root / "clip768", hidden_size=768)}


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_offline_wandb(path: Path) -> dict:
    """What one offline W&B run file holds: id, group, name, job_type, tags, the logged config, history rows."""
    import json

    from ldmlab.compare import wandb_records

    run: dict = {"config": {}, "history": []}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, group=r.run_group, name=r.display_name, job_type=r.job_type, tags=list(r.tags))
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update if i.key})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    return run
