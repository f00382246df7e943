"""The fine-tuning proof (ldmlab.pipeline.finetune_demo): every preset's train.py runs compose and build, and
follow the machine (bf16 + torch.compile on a CUDA node, fp32 eager on the CPU); the budget's start refusal and
its deadline (a real Trainer stopped with a checkpoint, then resumed); bad settings refused in one line; and the
GPU configuration's whole flow rehearsed at toy size on the CPU: a call stopped by its budget, the next one
resuming it and finishing every stage, the result table's rows, then the command again: finished stages
skipped, an unfinished one refused by the budget in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import CONF, REPO, make_tiny_vae_export, shared_data_dir
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from test_ema import TinyModule, loader

from ldmlab.callbacks.deadline import Deadline
from ldmlab.callbacks.preemption import Preempted, Preemption
from ldmlab.data.demo import class_names
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.lit.finetune import DreamBooth, LoRA, TextualInversion
from ldmlab.lit.weights import save_weights
from ldmlab.machine import Machine, resolve_machine
from ldmlab.pipeline.budget import Budget, BudgetSpent
from ldmlab.pipeline.finetune_demo import run_args, run_proof
from ldmlab.pipeline.finetune_parts import build_text_encoder, vocabulary
from ldmlab.pipeline.run import overrides

PRESETS = sorted(p.stem for p in (CONF / "finetune_demo").glob("*.yaml"))
MODELS = ["pretrained", "dreambooth", "dreambooth_no_prior", "lora", "textual_inversion"]
FINETUNES = {"dreambooth": DreamBooth, "dreambooth_no_prior": DreamBooth, "lora": LoRA,
             "textual_inversion": TextualInversion}


def compose_proof(preset: str, root: Path, *extra: str) -> DictConfig:
    """conf/finetune_demo.yaml with `finetune_demo=<preset>`, its dir and docs under `root`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("finetune_demo", overrides=[f"finetune_demo={preset}", f"dir={root}", f"paths.root_dir={root}",
                                                   f"paths.data_dir={shared_data_dir()}", f"docs={root}/docs", *extra])


def call(preset: str, root: Path, budget: Budget, *extra: str) -> list[str]:
    """One call of the proof in this process, as `python -m ldmlab.pipeline.finetune_demo` makes it (its stages
    compose train.py configs: Hydra stays initialised)."""
    cfg = compose_proof(preset, root, *extra)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return run_proof(cfg, budget)


def compose_run(args: list[str], out: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=args)
    cfg.paths.output_dir = str(out)
    return cfg


def instantiate_model(cfg: DictConfig) -> pl.LightningModule:
    return hydra.utils.instantiate(cfg.model, _convert_="all", optimizer=hydra.utils.instantiate(cfg.optimizer))


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_its_runs_and_follows_the_machine(preset: str, tmp_path: Path) -> None:
    """Each train.py run of a preset composes and instantiates (model and data) against stand-ins at the paths
    its overrides name; the U-Net reads the built text encoder; each fine-tune is the method its name says."""
    cfg = compose_proof(preset, tmp_path)
    make_tiny_vae_export(tmp_path / "vae" / "export" / "vae.safetensors")
    t = cfg.text_encoder
    build_text_encoder(tmp_path / "finetune" / "text_encoder", vocabulary(cfg, class_names()), width=t.width,
                       max_length=t.max_length, layers=t.layers, heads=t.heads)
    pre = compose_run(run_args(cfg, ["text_model", "pretrain"]), tmp_path / "pretrain")
    module = instantiate_model(pre)
    assert isinstance(module.conditioner, TextConditioner) and module.unet.config["context_dim"] == t.width
    assert pre.trainer.max_steps == cfg.pretrain.steps and pre.data.decoder.image_size == cfg.image_size
    hydra.utils.instantiate(pre.data, _convert_="all")
    save_weights(tmp_path / "finetune" / "pretrain" / "export" / "unet.safetensors", module.unet.state_dict(),
                 module.unet.config, "unet", latent_scale="0.5")
    for name, run in cfg.runs.items():
        run_cfg = compose_run(run_args(cfg, list(run.args), list(run.extra)), tmp_path / name)
        tuned = instantiate_model(run_cfg)
        assert isinstance(tuned.finetune, FINETUNES[name]) and run_cfg.trainer.max_steps == cfg.tune.steps
        assert tuned.finetune.prior_weight == (1.0 if name == "dreambooth" else 0.0)
        hydra.utils.instantiate(run_cfg.data, _convert_="all")
    vae = compose_run(overrides(cfg, "vae"), tmp_path / "vae")
    assert vae.data.decoder.image_size == cfg.image_size
    node, laptop = Machine(gpus=1, bf16=True), Machine(gpus=0, bf16=False)
    # no trainer= in the proof's runs, nor (gpu.yaml, tiny.yaml) in the VAE stage: the machine's, speed=auto
    for run_cfg in (pre, vae) if preset != "cpu" else (pre,):
        on_gpu = resolve_machine(run_cfg.copy(), node)
        assert (on_gpu.trainer.accelerator, on_gpu.trainer.precision) == ("gpu", "bf16-mixed")
        assert on_gpu.callbacks.speed.compile == "auto" and on_gpu.callbacks.speed.channels_last
        on_cpu = resolve_machine(run_cfg.copy(), laptop)
        assert (on_cpu.trainer.accelerator, on_cpu.trainer.precision) == ("cpu", "32-true")
        assert on_cpu.callbacks.speed is None


def test_every_override_string_lives_in_the_base_preset() -> None:
    """gpu.yaml and tiny.yaml change numbers: a config path renamed in train.py's tree is one edit (cpu.yaml)."""
    for preset in ("gpu", "tiny"):
        text = (CONF / "finetune_demo" / f"{preset}.yaml").read_text()
        assert not re.search(r"^\s*-\s*(model\.(diffusion|training|finetune)|"
                             r"model/)", text, re.MULTILINE), preset


def test_bad_settings_are_refused_in_one_line_before_any_stage(tmp_path: Path) -> None:
    for setting, message in [("held_out=tulip", "held_out=tulip is not a demo photograph: one of astronaut"),
                             ("image_size=48", "image_size=48 but the VAE stage's crops are 64 px: set image_size=64"),
                             ("instance_crops=0", "instance_crops=0: the fine-tunes need at least one crop")]:
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            call("tiny", tmp_path, Budget(), setting)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "vae").exists()


# ---------------------------------------------------------------- budget


def test_budget_refuses_a_stage_that_cannot_start_in_the_time_left(tmp_path: Path) -> None:
    budget = Budget(seconds=100, start_training=150, start_other=30, save=25, started=time.time() - 10)
    ran: list[Path] = []
    budget.guard("notes", ran.append)(tmp_path)  # 90 s left: enough for a short stage
    with pytest.raises(BudgetSpent, match=r"^9\d s left of budget.seconds=100, pretrain needs 150 s to start "
                                          r"\(budget.start_training\)$"):
        budget.guard("pretrain", ran.append, training=True)(tmp_path)
    assert ran == [tmp_path]
    assert Budget().left() == float("inf")
    cfg = compose_run(["trainer.max_steps=2"], tmp_path)
    assert "deadline" not in Budget().arm(cfg).callbacks
    assert budget.arm(cfg).callbacks.deadline.stop_at == pytest.approx(budget.started + 75)


def test_a_deadline_checkpoints_at_a_step_boundary_and_the_next_fit_resumes(tmp_path: Path) -> None:
    """A real Trainer: past its deadline the run saves hpc_ckpt_1 after step 1 and stops (exit 0); the next fit
    in the same dir resumes there. Without a Preemption callback the run just ends early."""
    def fit(callbacks: list, ckpt: Path | None = None) -> pl.Trainer:
        trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)
        trainer.fit(TinyModule(), loader(), ckpt_path=ckpt)
        return trainer

    with pytest.raises(Preempted):
        fit([Deadline(stop_at=time.time() - 1), Preemption()])
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1
    assert fit([Preemption()], ckpt).global_step == 4
    assert fit([Deadline(stop_at=0)]).global_step == 1  # no Preemption: stops, nothing to resume from


# ---------------------------------------------------------------- the GPU flow at toy size on the CPU


@pytest.fixture(scope="module")
def proof(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two calls of finetune_demo=tiny: the first with a deadline already past (the VAE stops after a step),
    the second without a budget (everything else)."""
    root = tmp_path_factory.mktemp("proof")
    with pytest.raises(Preempted):
        call("tiny", root, Budget(seconds=1000, save=1000))  # stop_at: its start
    stopped = sorted(p.name for p in (root / "vae").iterdir())
    table = call("tiny", root, Budget())
    return {"root": root, "stopped": stopped, "table": table}


@pytest.mark.slow
def test_a_call_stopped_by_its_budget_is_resumed_by_the_next(proof: dict) -> None:
    root = proof["root"]
    assert "hpc_ckpt_1.ckpt" in proof["stopped"] and "result.json" not in proof["stopped"]
    vae = json.loads((root / "vae" / "result.json").read_text())
    assert vae["steps"] == 2  # vae.steps of tiny.yaml: step 1 before the stop, step 2 after the resume
    steps = [int(r["step"]) for r in _csv(root / "vae") if r.get("train/rec_loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 1  # each step logged once across both calls


@pytest.mark.slow
def test_the_rehearsal_writes_one_table_row_per_model(proof: dict) -> None:
    root, table = proof["root"], proof["table"]
    rows = [line.split(" | ") for line in table[2:]]
    assert [r[0].strip("| ") for r in rows] == MODELS
    assert [r[1] for r in rows] == ["`a sks photo`"] * 4 + ["`a photo of <new>`"]
    for r in rows:
        assert re.fullmatch(r"\d+\.\d%", r[2]) and re.fullmatch(r"\d+\.\d%", r[3])
    assert (root / "docs" / "table.md").read_text().splitlines() == table
    results = json.loads((root / "docs" / "results.json").read_text())["results"]
    for m in MODELS:
        j = results[f"judge_{m}"]
        assert 0 <= j["new_share"] <= 1 and sum(j["new_called"]) == 3 and len(j["old_per_class"]) == 10
    grid = Image.open(root / "docs" / "samples.png")  # the training crops and 3 new-prompt samples per model
    assert grid.height == 6 * (64 + 2) + 2 and grid.width > 3 * (64 + 2)
    assert Image.open(root / "docs" / "old_prompts.png").height == 5 * (64 + 2) + 2


@pytest.mark.slow
def test_each_method_trains_and_exports_its_own_part(proof: dict) -> None:
    ft = proof["root"] / "finetune"
    exports = {m: sorted(p.name for p in (ft / m / "export").glob("*.safetensors")) for m in FINETUNES}
    assert exports["dreambooth"] == exports["dreambooth_no_prior"] == ["unet.safetensors", "vae.safetensors"]
    assert exports["lora"] == ["unet_lora.safetensors", "unet_lora_kohya.safetensors", "vae.safetensors"]
    assert exports["textual_inversion"] == ["learned_embeds.safetensors", "vae.safetensors"]
    prior = [r for r in _csv(ft / "dreambooth") if r.get("train/prior_loss")]
    assert prior and not any(r.get("train/prior_loss") for r in _csv(ft / "dreambooth_no_prior"))
    manifest = json.loads((ft / "pretrain" / "class_images" / "manifest.json").read_text())
    assert (manifest["prompt"], manifest["splits"]["train"]["samples"]) == ("a photo", 2)
    overrides = (ft / "lora" / ".hydra" / "overrides.yaml").read_text()
    assert "model.training.unet_init=" in overrides and "deadline" not in overrides  # the budget is not a setting


@pytest.mark.slow
def test_the_command_again_skips_finished_stages_and_stops_cleanly_at_its_budget(proof: dict) -> None:
    """The CLI with a budget too small for any stage to start: the 13 finished stages are skipped, the one whose
    result was taken away is refused in one line, and the call exits 0 listing what is done."""
    root = proof["root"]
    judged = root / "finetune" / "judge_textual_inversion" / "result.json"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("result.json") if p != judged}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "ldmlab.pipeline.finetune_demo", "finetune_demo=tiny", f"dir={root}",
           f"paths.root_dir={root}", f"paths.data_dir={shared_data_dir()}", f"docs={root}/docs",
           "budget.seconds=1000", "budget.start_training=2000", "budget.start_other=2000"]
    judged.rename(judged.with_suffix(".bak"))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        judged.with_suffix(".bak").rename(judged)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and len(stamps) == 13 and out.count("done before") == 13, out[-3000:]
    assert re.search(r"\nbudget: \d+ s left of budget.seconds=1000, judge_textual_inversion needs 2000 s to start "
                     r"\(budget.start_other\)\. Done: classifier, data, dreambooth, .*, vae\. The same command", out)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def _csv(run_dir: Path) -> list[dict[str, str]]:
    from conftest import read_metrics

    return read_metrics(run_dir)
