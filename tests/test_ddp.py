"""Trainer configs for scale-out, and CPU DDP (gloo) through Lightning's launcher: one run dir per run or job."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from conftest import TINY, compose_train, run_train
from pytorch_lightning.strategies import FSDPStrategy
from test_sweeps import global_step, last_metric

from ldmlab.machine import Machine, resolve_machine
from ldmlab.nn.attention import SpatialTransformer
from ldmlab.nn.unet_blocks import ResBlock
from ldmlab.utils.distributed import config_flags

DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", *TINY,
           "model.loss.perceptual_weight=0"]


def test_scale_out_trainer_configs(tmp_path: Path) -> None:
    """ddp: N GPUs of a node in bf16; multinode: num_nodes of them; fsdp: shards per U-Net block. The DDP
    strategy searches for unused parameters for the VAE (its GAN steps) only, as the model config says."""
    node = Machine(gpus=8, bf16=True)
    ddp = resolve_machine(compose_train(["trainer=ddp", "trainer.devices=8"], tmp_path), node).trainer
    assert (ddp.accelerator, ddp.devices, ddp.num_nodes, ddp.precision) == ("gpu", 8, 1, "bf16-mixed")
    assert ddp.strategy == "ddp_find_unused_parameters_true"  # the default model is the VAE
    ldm = resolve_machine(compose_train(["trainer=ddp", "model=unet_sd15"], tmp_path), node).trainer
    assert ldm.strategy == "ddp"
    multi = resolve_machine(compose_train(["trainer=multinode", "trainer.num_nodes=4"], tmp_path), node).trainer
    assert (multi.num_nodes, multi.devices, multi.strategy) == (4, 8, ddp.strategy)
    fsdp = compose_train(["trainer=fsdp"], tmp_path).trainer
    assert (fsdp.accelerator, fsdp.precision) == ("gpu", "bf16-mixed")
    strategy = hydra.utils.instantiate(fsdp.strategy)  # Lightning needs a GPU to run it, not to build it
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {ResBlock, SpatialTransformer}
    assert strategy.kwargs["use_orig_params"] is True


def test_config_flags_keep_only_where_the_config_is() -> None:
    argv = ["-m", "-cn", "other", "--config-path=/c", "model=vae_tiny", "optimizer.lr=1e-4,2e-4", "--multirun"]
    assert config_flags(argv) == ["-cn", "other", "--config-path=/c"]


def ddp_ranks_started(output: str) -> int:
    """How many processes joined a 2-process gloo world (Lightning logs one line per rank)."""
    return sum(f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/2" in output for r in (0, 1))


@pytest.mark.slow
def test_ddp_run_writes_one_run_dir(tmp_path: Path) -> None:
    """Rank 1 is re-launched by Lightning yet uses rank 0's timestamped run dir; only rank 0 writes .hydra/."""
    proc = run_train(DDP_CPU, cwd=tmp_path)
    assert ddp_ranks_started(proc.stdout + proc.stderr) == 2
    [run_dir] = list((tmp_path / "outputs" / "debug" / "runs").iterdir())
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 6
    assert last_metric(run_dir, "val/psnr") > 0


@pytest.mark.slow
def test_ddp_multirun_runs_each_job_once_in_its_own_dir(tmp_path: Path) -> None:
    """`-m` + DDP: each job's rank 1 runs that job only (not the sweep again), in the job's dir; the second job
    starts a fresh process group."""
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", *DDP_CPU, "model.loss.kl_weight=1e-6,1e-5", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert out.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one rank 1 per job
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert not (tmp_path / "outputs").exists()  # no child made a sweep or run dir of its own
    for job, kl in (("0", "1e-06"), ("1", "1e-05")):
        run_dir = sweep / job
        assert f"model.loss.kl_weight={kl}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert (run_dir / "train_rank1.log").exists()
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 6
