"""Non-finite losses: the step is skipped (no optimizer, scheduler or EMA update; counted in
`train/skipped_nonfinite`), for the LDM and for both VAE steps; under DDP all ranks skip together; too many in a
row stop the run with a checkpoint and a one-line message. The NaNs come from the data (NaN latents, a NaN
image), except the discriminator case, which uses a test double whose D loss is NaN (fault injection)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from conftest import REPO, read_metrics, shared_data_dir
from test_ldm_module import small_unet
from test_vae_module import ImageDicts, ParamTrace, tiny_module
from torch.utils.data import DataLoader, Dataset, Sampler

from ldmlab.callbacks.ema import EMA
from ldmlab.callbacks.nonfinite import NonFiniteGuard
from ldmlab.data.latents import npy_bytes
from ldmlab.diffusion import Diffusion, EpsPrediction, ddim_sample, scaled_linear
from ldmlab.lit.contract import TrainingModule
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.lit.nonfinite import NonFiniteSkips
from ldmlab.optim import warmup_cosine

NAN_BATCHES = (2, 3)
DDIM2 = Diffusion(EpsPrediction(), scaled_linear(), sampler=partial(ddim_sample, num_steps=2))


class Latents(Dataset):
    """Random latents; every sample of batches NAN_BATCHES (batch size 4) is NaN."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        z = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(i))
        return {"latent": z * math.nan if i // 4 in NAN_BATCHES else z, "label": 0}


def fit_on_cpu(module: pl.LightningModule, data: Dataset, max_steps: int, tmp_path: Path,
               callbacks: list[pl.Callback]) -> pl.Trainer:
    """Train on batches of 4 in order, no validation, logging or checkpoints."""
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


class StepTrace(pl.Callback):
    """Per batch: whether the U-Net, Adam's state, the LR schedule and the EMA changed, and the global step."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.rows = ema, []

    def _state(self, trainer: pl.Trainer, module: pl.LightningModule) -> list:
        opt = trainer.optimizers[0]
        return [[p.detach().clone() for p in module.unet.parameters()],
                [s["exp_avg"].clone() for s in opt.state.values()], trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                [v.clone() for v in self.ema.shadow.values()]]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = self._state(trainer, module), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        (before, step), after = self.before, self._state(trainer, module)
        changed = [before[i] != after[i] if i == 2 else len(before[i]) != len(after[i]) or any(
                   not torch.equal(a, b) for a, b in zip(before[i], after[i])) for i in range(4)]
        self.rows.append((*changed, trainer.global_step - step, list(module.skips.skipped_on_host)))


def test_ldm_skips_nonfinite_steps_without_any_update(tmp_path: Path) -> None:
    module = LatentDiffusionModule(unet=small_unet(), diffusion=DDIM2, latent_scale=1.0, training={"p_uncond": 0.0},
                                   optimizer=partial(torch.optim.AdamW, lr=1e-3),
                                   lr_scheduler=partial(warmup_cosine, warmup_steps=10))
    ema = EMA(decay=0.9, warmup=False)
    trace, guard = StepTrace(ema), NonFiniteGuard(max_in_a_row=3)
    trainer = fit_on_cpu(module, Latents(), 5, tmp_path, [ema, trace, guard])
    # Lightning's automatic optimisation counts a skipped batch as a global step: 5 steps, 3 of them taken
    updated, skipped = (True, True, True, True, 1, []), (False, False, False, False, 1, ["train/loss"])
    assert trace.rows == [updated, updated, skipped, skipped, updated]
    assert guard.skipped == 2 and guard.in_a_row == 0 and ema.num_updates == 3
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 2
    assert all(torch.isfinite(p).all() for p in module.unet.parameters())


class Reports(pl.Callback):
    """What the LDM told the guard at each batch end: (global step, skipped losses) pairs."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.rows.append(list(module.skips.reports))


@pytest.mark.parametrize("defer", [False, True], ids=["read-at-once", "read-a-step-late"])
def test_fused_adamw_skips_on_the_device_and_the_host_learns_a_step_late(tmp_path: Path, defer: bool) -> None:
    """The default optimizer (fused AdamW) skips a non-finite step in its kernel (found_inf): weights, moments and
    step count untouched, no host sync. The EMA takes its step toward the unchanged weights. The host reads the
    flag at once on the CPU or, as on a GPU (forced here with defer_nonfinite), one step later; the LR schedule
    then leaves out one step per skipped step, late by one, and a run of skips is read at once."""
    module = LatentDiffusionModule(unet=small_unet(), diffusion=DDIM2, latent_scale=1.0, training={"p_uncond": 0.0},
                                   optimizer=partial(torch.optim.AdamW, lr=1e-3, fused=True),
                                   lr_scheduler=partial(warmup_cosine, warmup_steps=10))
    module.skips.defer = defer
    ema = EMA(decay=0.9, warmup=False)
    trace, reports, guard = StepTrace(ema), Reports(), NonFiniteGuard(max_in_a_row=3)
    trainer = fit_on_cpu(module, Latents(), 5, tmp_path, [ema, trace, reports, guard])
    weights, moments, schedule, shadow, steps, _ = zip(*trace.rows)
    assert weights == moments == (True, True, False, False, True) and shadow == (True,) * 5 and steps == (1,) * 5
    skipped = ["train/loss"]
    if defer:
        assert schedule == (True, True, True, False, False)
        assert reports.rows == [[], [(0, [])], [(1, [])], [(2, skipped), (3, skipped)], [(4, [])]]
    else:
        assert schedule == (True, True, False, False, True)
        assert reports.rows == [[(0, [])], [(1, [])], [(2, skipped)], [(3, skipped)], [(4, [])]]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3  # one per step taken
    assert float(trainer.optimizers[0].state[next(module.unet.parameters())]["step"]) == 3
    assert guard.skipped == 2 and guard.in_a_row == 0 and ema.num_updates == 5


def test_an_unread_flag_travels_in_the_checkpoint() -> None:
    """A checkpoint between a skipped step and the step that reads its flag keeps the flag: the resumed run
    reports the skip (and leaves out its scheduler step) where the uninterrupted run does."""
    def batch(ledger: NonFiniteSkips, step: int, loss: float) -> None:
        ledger.begin(step)
        ledger.observe(torch.tensor(loss))
        ledger.take("train/loss", fused=True)

    skips, resumed = NonFiniteSkips(), NonFiniteSkips()
    skips.defer = resumed.defer = True
    batch(skips, 7, math.nan)
    state = skips.state_dict()  # ends step 7's group; its flag is not read yet
    assert skips.reports == [] and skips.unscheduled == {"train/loss": 0} and skips.last_loss is None
    resumed.load_state_dict(state)
    for ledger in (skips, resumed):
        batch(ledger, 8, 0.25)
        assert ledger.reports == [(7, ["train/loss"]), (8, [])] and ledger.unscheduled == {"train/loss": 1}
        assert ledger.last_loss == 0.25


class NaNImages(ImageDicts):
    """Batch 1 (size 4) holds a NaN image: the generator loss is NaN."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return {**item, "image": item["image"] * math.nan} if i == 5 else item


def nan_d_loss_at_batch_3(module: pl.LightningModule) -> None:
    """Fault injection: the discriminator loss of batch 3 is NaN."""
    d_loss = module._discriminator_loss

    def nan_at_batch_3(x, rec):
        loss, logs = d_loss(x, rec)
        return (loss * math.nan if module.trainer.fit_loop.epoch_loop.batch_idx == 3 else loss), logs

    module._discriminator_loss = nan_at_batch_3


def test_vae_skips_the_generator_and_the_discriminator_step(tmp_path: Path) -> None:
    """Batch 1: NaN image → no G and no D step; batch 3: the D loss is NaN (injected) → G steps, D does not.
    Plain Adam: each flag is read before its step, which is left out on the host."""
    module = tiny_module(gan={"disc_start": 0})
    nan_d_loss_at_batch_3(module)
    trace, guard = ParamTrace(), NonFiniteGuard()
    fit_on_cpu(module, NaNImages(), 5, tmp_path, [trace, guard])
    assert trace.changed == [(True, True), (False, False), (True, True), (True, False), (True, True)]
    assert trace.steps == [1, 2, 3, 4, 5]  # global_step counts batches, skipped or not
    assert guard.skipped == 2


def test_vae_with_fused_adam_skips_on_the_device_and_learns_a_step_late(tmp_path: Path) -> None:
    """As above with fused Adam and the GPU's deferral (forced here): the kernels leave G and D (batch 1) or D
    (batch 3) as they were, every batch counts as a global step, the host learns of batch 1 at batch 2 and, as
    a run of skips is read at once, of batch 2 at once; batch 3's skip is read at batch 4. Each LR schedule
    leaves out one step per update its optimizer skipped, in the batch that learns of it."""
    fused_adam = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9), fused=True)
    module = tiny_module(gan={"disc_start": 0}, optimizer=fused_adam,
                         lr_scheduler=partial(warmup_cosine, warmup_steps=10))
    module.skips.defer = True
    nan_d_loss_at_batch_3(module)
    trace, reports, guard = ParamTrace(), Reports(), NonFiniteGuard()
    trainer = fit_on_cpu(module, NaNImages(), 5, tmp_path, [trace, reports, guard])
    assert trace.changed == [(True, True), (False, False), (True, True), (True, False), (True, True)]
    assert trace.steps == [1, 2, 3, 4, 5]
    both = ["generator loss train/total_loss", "discriminator loss train/d_loss"]
    assert reports.rows == [[], [(0, [])], [(1, both), (2, [])], [], [(3, both[1:]), (4, [])]]
    assert guard.skipped == 2
    # five scheduler calls each; G left out batch 2's (for batch 1), D batch 2's (for batch 1) and batch 4's
    # (for batch 3)
    g_sched, d_sched = (config.scheduler for config in trainer.lr_scheduler_configs)
    assert (g_sched.last_epoch, d_sched.last_epoch) == (4, 3)
    assert module.skips.unscheduled == {both[0]: 0, both[1]: 0}
    assert trainer.progress_bar_metrics["rec_loss"] == module.skips.last_loss  # read from the host copy


def test_vae_before_disc_start_reports_and_unschedules_the_generator_only(tmp_path: Path) -> None:
    """Device-side skips before the GAN starts: the discriminator neither steps nor owes a scheduler step."""
    fused_adam = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9), fused=True)
    module = tiny_module(gan={"disc_start": 100}, optimizer=fused_adam,
                         lr_scheduler=partial(warmup_cosine, warmup_steps=10))
    module.skips.defer = True
    trace, reports = ParamTrace(), Reports()
    trainer = fit_on_cpu(module, NaNImages(), 4, tmp_path, [trace, reports])
    assert trace.changed == [(True, False), (False, False), (True, False), (True, False)]
    assert reports.rows == [[], [(0, [])], [(1, ["generator loss train/total_loss"]), (2, [])], []]
    g_sched, d_sched = (config.scheduler for config in trainer.lr_scheduler_configs)
    assert (g_sched.last_epoch, d_sched.last_epoch) == (3, 0)


# ---------------------------------------------------------------- a run that keeps failing, under DDP


def latent_shards(root: Path, nan_shard: int) -> Path:
    """cache_latents-style shards: 2 × 16 latents (4, 8, 8); every latent of shard `nan_shard` is NaN."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar"), encoder=False) as sink:
            for i in range(16):
                z = rng.standard_normal((4, 8, 8)).astype(np.float16) * (np.nan if s == nan_shard else 1)
                sink.write({"__key__": f"s{s}_{i}", "latent.npy": npy_bytes(z), "cls": str(i % 10).encode()})
    manifest = {"counts": {"train-000000.tar": 16, "train-000001.tar": 16}, "latent_shape": [4, 8, 8]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.slow
def test_ddp_ranks_skip_together_and_a_run_of_nans_stops_with_a_checkpoint(tmp_path: Path) -> None:
    """2 CPU ranks, each reading one of two shards: one rank sees only NaN latents, the other none. Every step is
    skipped on both (else the clean rank's backward would wait forever for the other's gradients); after 3 in a
    row the run saves a checkpoint and exits non-zero with one line that names the loss and what to try."""
    data = latent_shards(tmp_path / "latents", nan_shard=1)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}",
           "model=unet_small", "model.vae=null", "model.latent_scale=0.5", "data=wds_latents", f"data.root={data}",
           "data.batch_size=4", "data.num_workers=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp", "speed=none", "trainer.precision=32-true", "trainer.max_steps=20",
           "trainer.limit_val_batches=0", "callbacks.nonfinite.max_in_a_row=3", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    message = (f"3 training steps in a row had a non-finite train/loss (last at step 2); stopped with checkpoint "
               f"{run}/hpc_ckpt_1.ckpt. Try a lower optimizer.lr")
    assert message in out, out[-4000:]
    ckpt = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 3, "in_a_row": 3}
    assert "Traceback" not in out, out[-4000:]
    # the fused AdamW skipped every step on the device (found_inf): step counts and moments still zero
    states = ckpt["optimizer_states"][0]["state"].values()
    assert states and all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
                          for s in states)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.slow
def test_the_nan_stop_is_one_line_and_its_metrics_row_shows_the_nan(tmp_path: Path) -> None:
    """`python train.py optimizer.lr=1e6` (the tiny VAE on the demo photos) diverges at once: the run stops with
    its checkpoint, the one line and exit code 1, no traceback; the last metrics row is the stopping step's and
    shows its non-finite loss, not an earlier batch's."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}",
           "optimizer.lr=1e6", "trainer.max_steps=30", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=50",
           "callbacks.nonfinite.max_in_a_row=2", "data.batch_size=2", f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "Traceback" not in out and "Error executing job" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if "training steps in a row had a non-finite" in line]
    assert len(lines) == 1 and f"stopped with checkpoint {run}/hpc_ckpt_1.ckpt" in lines[0], out[-4000:]
    ckpt = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)
    assert ckpt["callbacks"]["NonFiniteGuard"]["in_a_row"] == 2
    rows = read_metrics(run)
    last = [r for r in rows if r.get("train/total_loss")][-1]
    assert int(last["step"]) == ckpt["global_step"] - 1 and float(last["train/skipped_nonfinite"]) >= 2
    assert not math.isfinite(float(last["train/total_loss"])), last


class RankInterleaved(Sampler):
    """Rank r of 2 reads items r, r + 2, r + 4, ... in order (a DistributedSampler without its shuffle)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(torch.distributed.get_rank(), self.n, 2))

    def __len__(self) -> int:
        return self.n // 2


class SaveReplica(pl.Callback):
    """Each rank writes its autoencoder and discriminator weights at the end of training."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        torch.save([p.detach().clone() for p in module.parameters()], self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("defer", [False, True], ids=["read-at-once", "read-a-step-late"])
def test_vae_ranks_skip_together_under_ddp(tmp_path: Path, defer: bool) -> None:
    """2 CPU ranks (gloo), batches of 2 in order: rank 1's batch 1 holds the NaN image, rank 0's is clean. Both
    skip G and D there (the finite flag is all-reduced before either optimizer steps): neither waits forever in
    DDP's gradient all-reduce, the replicas end equal, and rank 0's checkpoint counts the skip its own loss did
    not have. Read at once or, as on a GPU, a step late (forced here), the skipped batch counts as a global step
    (fused Adam's found_inf), so each optimizer stepped 3 times in 4 batches."""
    fused_adam = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9), fused=True)
    module = tiny_module(gan={"disc_start": 0}, optimizer=fused_adam)
    module.skips.defer = defer
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                         max_steps=4, logger=False, enable_progress_bar=False, limit_val_batches=0,
                         enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                         callbacks=[NonFiniteGuard(), last, SaveReplica(tmp_path)])
    images = NaNImages()  # item 5: rank 1's batch 1 is [5, 7]
    trainer.fit(module, DataLoader(images, batch_size=2, sampler=RankInterleaved(len(images))))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"]["NonFiniteGuard"] == {"skipped": 1, "in_a_row": 0}
    batches = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert (batches, ckpt["global_step"]) == (4, 4)
    for opt_state in ckpt["optimizer_states"]:  # G, then D
        assert {float(s["step"]) for s in opt_state["state"].values()} == {3.0}
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) and torch.isfinite(a).all() for a, b in zip(rank0, rank1, strict=True))


def test_the_guard_waits_for_a_report_before_it_stops() -> None:
    """Resumed from its own stop checkpoint (in_a_row at the limit), the guard neither stops nor fails on a
    batch whose flag the host has not read yet; the next finite step ends the streak."""

    class Quiet(TrainingModule):
        def log(self, *args, **kwargs) -> None:
            pass

    guard, module = NonFiniteGuard(max_in_a_row=3), Quiet()
    guard.load_state_dict({"skipped": 3, "in_a_row": 3})
    trainer = pl.Trainer(accelerator="cpu", logger=False)
    module.skips.defer = True
    for step in (3, 4):  # finite steps, each read a step late
        module.skips.begin(step)
        module.skips.observe(torch.tensor(0.5))
        module.skips.take("train/loss", fused=True)
        guard.on_train_batch_end(trainer, module)
        assert module.skips.reports == ([] if step == 3 else [(3, [])])
    assert guard.state_dict() == {"skipped": 3, "in_a_row": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_the_ldm_step_on_a_gpu_has_no_host_sync_even_while_skipping(tmp_path: Path) -> None:
    """Fused AdamW on CUDA: steps 3-12, two of them with NaN latents, run without one host sync (the flag goes to
    the kernel as found_inf and reaches the host a step later); the skips are still counted and unscheduled.
    The syncs are listed by the benchmark's SyncReport (CUDA's sync debug mode)."""
    from ldmlab.bench.train_path import SyncReport

    class Batches(Dataset):
        def __len__(self) -> int:
            return 8 * 14

        def __getitem__(self, i: int) -> dict:
            z = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(i))
            return {"latent": z * math.nan if i // 8 in (6, 7) else z, "label": 0}

    module = LatentDiffusionModule(unet=small_unet(), diffusion=DDIM2, latent_scale=1.0,
                                   optimizer=partial(torch.optim.AdamW, lr=1e-4, fused=True),
                                   lr_scheduler=partial(warmup_cosine, warmup_steps=10))
    guard = NonFiniteGuard(max_in_a_row=5)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=14, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0,
                         enable_model_summary=False,
                         callbacks=[EMA(decay=0.9), guard, SyncReport(str(tmp_path / "syncs.txt"), skip=3, steps=9)])
    trainer.fit(module, DataLoader(Batches(), batch_size=8, pin_memory=True))
    report = (tmp_path / "syncs.txt").read_text()
    assert report.startswith("host syncs in steps 3-12: 0\n"), report
    assert guard.skipped == 2 and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12
