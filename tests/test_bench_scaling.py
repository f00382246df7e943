"""The weak-scaling benchmark (ldmlab.bench.scaling) on the CPU: the real thing over gloo at N = 1, 2 (img/s,
efficiency, checkpoint save, exact resume); its FSDP case composed but not run (Lightning's FSDP needs GPUs); the
shards it writes, its resume check and its one-line errors, in-process."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from pytorch_lightning.strategies import FSDPStrategy

from ldmlab.bench import scaling
from ldmlab.callbacks.ema import EMA
from ldmlab.data.latents import LatentDecoder
from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader

CPU_RUN = ["--accelerator", "cpu", "--devices", "1,2", "--model", "unet_small", "--per-device-batch", "4",
           "--latent", "8", "--steps", "6", "--skip", "2", "--fsdp-devices", "none", "--extra", "data.num_workers=1"]


def table_rows(markdown: str) -> dict[tuple[str, int], list[str]]:
    """{(strategy, devices): the other cells} of the section's table."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if re.match(r"\| (ddp|fsdp) \| \d+ \|", line)]
    return {(r[0], int(r[1])): r[2:] for r in rows}


@pytest.mark.slow
def test_weak_scaling_on_cpu_gloo(tmp_path: Path) -> None:
    """Two DDP rows with throughput and efficiency; the largest N saved a checkpoint that resumed exactly."""
    out = tmp_path / "bench.md"
    text = scaling.main([*CPU_RUN, "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    assert "### Weak scaling (`model=unet_small`" in text and "peak RSS GiB per process (CPU)" in text
    rows = table_rows(text)
    assert sorted(rows) == [("ddp", 1), ("ddp", 2)]
    for (_, n), (img_s, per_device, efficiency, peak, *_) in rows.items():
        assert float(img_s) > 0 and float(per_device) == pytest.approx(float(img_s) / n, abs=0.1)
        assert re.fullmatch(r"\d+%", efficiency) and float(peak) > 0
    assert rows[("ddp", 1)][2] == "100%"
    save_s, size_gb, exact = rows[("ddp", 2)][4:]
    assert float(save_s) > 0 and float(size_gb) > 0 and exact == "True"
    assert rows[("ddp", 1)][4:] == ["–", "–", "–"]  # the save and resume are timed at the largest N only


def test_fsdp_and_ddp_cases_compose_for_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a (pretend) 2-GPU machine the defaults run DDP at 1, 2 and FSDP at 2, and every case's overrides
    compose into the config train.py would run; the FSDP strategy instantiates without a GPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = scaling.parse_args([])
    assert args.cases == [scaling.Case("ddp", 1, False), scaling.Case("ddp", 2, True), scaling.Case("fsdp", 2, True)]
    for case in args.cases:
        cfg = scaling.compose_train(scaling.case_overrides(args, case, tmp_path / "shards", tmp_path / "clip"))
        assert (cfg.trainer.devices, cfg.trainer.precision, cfg.data.batch_size) == (case.devices, "bf16-mixed", 64)
        assert cfg.model.conditioner.path == str(tmp_path / "clip") and cfg.model.vae is None
        assert cfg.data.root == str(tmp_path / "shards")
        assert cfg.data.samples_per_epoch == case.devices * 64 * (60 + scaling.RESUME_STEPS + 1)
        assert cfg.callbacks.ema is not None and cfg.callbacks.last_checkpoint is None
        assert cfg.callbacks.speed._target_ == "ldmlab.callbacks.speed.GPUSpeed"  # timed as users run it
    ddp_cfg = scaling.compose_train(scaling.case_overrides(args, args.cases[0], tmp_path, None)).trainer
    assert (ddp_cfg.strategy, ddp_cfg.accelerator) == ("ddp", "auto")
    fsdp_cfg = scaling.compose_train(scaling.case_overrides(args, args.cases[-1], tmp_path, None)).trainer
    assert fsdp_cfg.accelerator == "gpu"
    assert isinstance(hydra.utils.instantiate(fsdp_cfg.strategy), FSDPStrategy)
    assert scaling.NCCL_ENV.items() <= scaling.child_env("gpu").items()  # NVLink multicast off in every run
    assert scaling.NCCL_ENV["NCCL_NVLS_ENABLE"] == "0"


@pytest.mark.parametrize(("gpus", "argv", "message"), [
    (1, ["--devices", "3"], "3 devices asked for, but this machine sees 1 GPU(s)"),
    (2, ["--fsdp-devices", "4"], "4 devices asked for, but this machine sees 2 GPU(s)"),
    (0, [], "torch sees no GPU: use --accelerator cpu"),
    (1, ["--steps", "5", "--skip", "5"], "--steps not more than --skip"),
    (1, ["--devices", "none", "--fsdp-devices", "none"], "nothing to run"),
    (1, ["--devices", "two"], "--devices / --fsdp-devices take numbers"),
])
def test_one_line_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, gpus: int,
                         argv: list[str], message: str) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    assert message in capsys.readouterr().err


def test_default_devices_stop_at_the_gpus_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [(c.strategy, c.devices) for c in scaling.parse_args([]).cases] == [
        ("ddp", 1), ("ddp", 2), ("ddp", 4), ("fsdp", 4)]
    assert scaling.parse_args(["--devices", "none", "--fsdp-devices", "1"]).cases == [scaling.Case("fsdp", 1, True)]


def test_shards_are_what_wds_latents_reads(tmp_path: Path) -> None:
    """cache_latents' format: raw latents, a label per class model, a caption per text model."""
    scaling.write_latent_shards(tmp_path, shards=2, per_shard=8, side=8, num_classes=10)
    dm = ShardDataModule(root=str(tmp_path), decoder=LatentDecoder(), batch_size=4, num_workers=0, samples_per_epoch=12)
    batch = next(iter(EpochLoader(dm.make_train_set())))
    assert batch["latent"].shape == (4, 4, 8, 8) and batch["latent"].dtype == torch.float32
    assert all(0 <= label < 10 for label in batch["label"].tolist()) and all(t.split() for t in batch["text"])
    assert dm.make_decoder(train=True).shape == (4, 8, 8)  # from the manifest


def test_resume_check_sees_a_single_bit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """exact=True only for the saved step, EMA shadow and weights, bit for bit."""
    weights = {"w": torch.randn(3, 3)}
    ema = EMA()
    ema.shadow, ema.num_updates = {"w": weights["w"].clone()}, 4
    path = tmp_path / "x.ckpt"
    torch.save({"global_step": 4, "state_dict": weights, "callbacks": {"EMA": ema.state_dict()}}, path)
    check = scaling.ResumeCheck(str(path))
    module = SimpleNamespace(state_dict=lambda: weights)

    def exact(step: int = 4) -> bool:
        caplog.clear()
        trainer = SimpleNamespace(global_step=step, callbacks=[ema], strategy=object(), global_rank=0)
        with caplog.at_level(logging.INFO, logger=scaling.__name__):
            check.on_train_start(trainer, module)
        return caplog.records[-1].getMessage().endswith("exact=True")

    assert exact()
    assert not exact(step=5)
    ema.shadow["w"][0, 0] = torch.nextafter(ema.shadow["w"][0, 0], torch.tensor(1.0))  # one ulp
    assert not exact()


def test_a_failed_row_is_reported_and_the_rest_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """An OOM at N = 1 becomes a one-line row (its output's tail printed); N = 2 still runs, peak = max over
    ranks, and with no N = 1 number the efficiency comes from --baseline or stays empty."""
    outputs = iter([(1, "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory."),
                    (0, ("StepTimer: 0.5000 s/step over 4 steps\nPeakMemory rank 1: 1.700 GiB\n"
                        "PeakMemory rank 0: 1.500 GiB"))])
    monkeypatch.setattr(scaling, "run_train", lambda *args: next(outputs))
    args = scaling.parse_args(["--accelerator", "cpu", "--devices", "1,2", "--per-device-batch", "4", "--ckpt", "none"])
    rows = [scaling.measure(args, case, [], tmp_path, {}) for case in args.cases]
    assert "Traceback (most recent call last)" in capsys.readouterr().out
    assert rows[0]["error"] == "exit 1: torch.OutOfMemoryError: CUDA out of memory."
    assert (rows[1]["img_s"], rows[1]["peak_gib"]) == (16.0, 1.7)
    assert "| ddp | 2 | 16.0 | 8.0 | – | 1.70 | – | – | – |" in scaling.table(rows, cpu=True)
    assert "| ddp | 2 | 16.0 | 8.0 | 80% | 1.70 | – | – | – |" in scaling.table(rows, cpu=True, baseline=10.0)
