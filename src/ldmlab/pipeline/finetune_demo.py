"""Does each fine-tuning method learn? (issue 20) The proof on the demo photographs, as resumable stages.

    python -m ldmlab.pipeline.finetune_demo                    # CPU, after `make demo` (reuses its VAE and judge)
    python -m ldmlab.pipeline.finetune_demo finetune_demo=gpu  # demo_gpu size, one GPU, two 10-minute calls

1. The `pipeline=` preset's VAE and classifier stages (ldmlab.pipeline.run): the judge is a classifier trained on
   real crops of all 10 photographs, never on samples.
2. A text encoder and tokenizer are built here (CLIP architecture, random and frozen; one token per caption
   word) and a text-conditioned U-Net is pretrained with train.py on "a photo of <name>" crops of 9 photographs.
3. The 10th photograph (`held_out`) is taught from a few crops by DreamBooth (with and without prior
   preservation), LoRA and Textual Inversion, each a train.py run from the pretrained U-Net.
4. The judge scores the share of "new prompt" samples it calls the held-out photo, and the 9 old prompts' class
   accuracy (forgetting): <docs>/table.md, results.json and grids.

Every stage runs into <dir>/finetune/<stage> (the VAE and judge into <dir>/vae, <dir>/classifier) and is skipped
once its result.json exists; the train.py overrides of every run are in conf/finetune_demo/cpu.yaml. With
`budget.seconds`, a call ends cleanly before its limit (ldmlab.pipeline.budget) and the next call goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldmlab.callbacks.preemption import Preempted
from ldmlab.checkpointing import checkpoint_step
from ldmlab.configs import CONF_DIR
from ldmlab.data.demo import class_names
from ldmlab.machine import resolve_machine
from ldmlab.pipeline.budget import Budget, BudgetSpent
from ldmlab.pipeline.finetune_parts import (
    build_text_encoder,
    caption,
    data_stage,
    judge_stage,
    text_encoder_stage,
    vocabulary,
    write_docs,
)
from ldmlab.pipeline.report import mean_of_last, read_series
from ldmlab.pipeline.run import Step, classifier_step, overrides, resolve_dir, run_plan, vae_step
from ldmlab.pipeline.stages import compose_stage, describe_device, run_training

__all__ = ["build_text_encoder", "caption", "main", "run_proof"]  # the first two: tests build the same encoder
log = logging.getLogger("ldmlab.pipeline")


def run_args(cfg: DictConfig, parts: list[str], extra: list[str] | None = None) -> list[str]:
    """A train.py run's overrides: the named parts of `args`, its own `extra`, the proof's `extra`, then the
    pipeline's `common` (later ones win)."""
    lists = [*(cfg.args[p] for p in parts), extra or [], cfg.extra, cfg.common]
    return [str(o) for part in lists for o in _plain(part)]


def check(cfg: DictConfig, vae_cfg: DictConfig, names: list[str]) -> None:
    """One line per setting the proof cannot run with, before any stage starts."""
    if cfg.held_out not in names:
        raise ValueError(f"held_out={cfg.held_out} is not a demo photograph: one of {', '.join(names)}")
    if int(cfg.instance_crops) < 1:
        raise ValueError(f"instance_crops={cfg.instance_crops}: the fine-tunes need at least one crop")
    if int(cfg.image_size) != int(vae_cfg.data.decoder.image_size):
        raise ValueError(f"image_size={cfg.image_size} but the VAE stage's crops are "
                         f"{vae_cfg.data.decoder.image_size} px: set image_size={vae_cfg.data.decoder.image_size}")


def machine_trainer(cfg: DictConfig) -> DictConfig:
    """The trainer a train.py run of `cfg` gets on this machine (device, precision): the judge's too."""
    return resolve_machine(cfg.copy()).trainer


def train_stage(cfg: DictConfig, out: Path, args: list[str], budget: Budget) -> dict:
    """`python train.py <args>` into `out`, in this process as the pipeline's stages run; a run stopped at the
    budget's deadline raised Preempted, and a later call resumes it from its checkpoint."""
    run_cfg = budget.arm(compose_stage(cfg, out, args))
    try:
        run_training(run_cfg, out, args)
    finally:
        torch._dynamo.reset()  # the next run compiles its own U-Net from a clean slate, as a new process would
    steps, done = int(run_cfg.trainer.max_steps), checkpoint_step(out / "checkpoints" / "last.ckpt")
    if done != steps:  # stopped early without a stop checkpoint (ldmlab.callbacks.deadline's fallback)
        raise BudgetSpent(f"{out.name} stopped at step {done} of {steps}")
    series = read_series(out) if (out / "csv" / "metrics.csv").is_file() else {}  # none before log_every_n_steps
    return {"steps": done, "train_loss": mean_of_last(series, "train/loss"),
            "device": describe_device(run_cfg.trainer)}


def run_proof(cfg: DictConfig, budget: Budget) -> list[str]:
    """Every stage of the proof (finished ones skipped), then the docs; returns the result table's lines."""
    root, names = resolve_dir(cfg), class_names()
    vae_ov = overrides(cfg, "vae")
    vae_cfg = budget.arm(compose_stage(cfg, root / "vae", vae_ov))
    check(cfg, vae_cfg, names)
    pretrain_args = run_args(cfg, ["text_model", "pretrain"])
    trainer = machine_trainer(compose_stage(cfg, root / "finetune" / "pretrain", pretrain_args))
    training = {"vae", "pretrain", *cfg.runs}

    def guard(name: str, fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
        return budget.guard(name, fn, training=name in training)

    shared = [vae_step(vae_cfg, vae_ov), classifier_step(cfg, vae_cfg, trainer, root / "vae/export/vae.safetensors")]
    r = run_plan(root, shared, {}, guard)  # the pipeline's VAE and judge, as `python -m ldmlab.pipeline` runs them
    plan, depends = proof_plan(cfg, root, names, vae_cfg.data, trainer, budget)
    run_plan(root / "finetune", plan, r, guard, depends)
    return write_docs(cfg, r, ["pretrained", *cfg.runs], root / "finetune")


def proof_plan(cfg: DictConfig, root: Path, names: list[str], vae_data: DictConfig, trainer: DictConfig,
               budget: Budget) -> tuple[list[Step], dict[str, list[str]]]:
    """The proof's own stages in order (text encoder, data, pretraining, each fine-tune, each judging) and the
    stages each reads."""
    ft, judge_path, judge = root / "finetune", root / "classifier" / "classifier.safetensors", _plain(cfg.judge)

    def judged(model: str, run_dir: Path, prompt: str) -> Step:
        ckpt, spec = run_dir / "checkpoints" / "last.ckpt", {**judge, "prompt": prompt, "held_out": cfg.held_out}
        return f"judge_{model}", spec, lambda out: judge_stage(cfg, ckpt, prompt, names, judge_path, trainer, out)

    pretrain_args = run_args(cfg, ["text_model", "pretrain"])
    data_spec = {k: _plain(cfg[k]) for k in ("held_out", "instance_crops", "prompt", "ti_prompt")}
    plan: list[Step] = [
        ("text_encoder", {"words": vocabulary(cfg, names), **_plain(cfg.text_encoder)},
         lambda out: text_encoder_stage(cfg, names, out)),
        ("data", data_spec | {"per_class": cfg.pretrain.per_class}, lambda out: data_stage(cfg, vae_data, names, out)),
        ("pretrain", {"overrides": pretrain_args}, lambda out: train_stage(cfg, out, pretrain_args, budget)),
        judged("pretrained", ft / "pretrain", str(cfg.prompt)),
    ]
    depends = {"text_encoder": [], "data": ["vae"], "pretrain": ["vae", "text_encoder", "data"],
               "judge_pretrained": ["pretrain", "classifier"]}
    for name, run in cfg.runs.items():
        args = run_args(cfg, list(run.args), list(run.extra))
        plan += [(name, {"overrides": args}, lambda out, a=args: train_stage(cfg, out, a, budget)),
                 judged(name, ft / name, str(run.prompt))]
        depends |= {name: ["pretrain"], f"judge_{name}": [name, "classifier"]}
    return plan, depends


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune_demo")
def main(cfg: DictConfig) -> None:
    """`python -m ldmlab.pipeline.finetune_demo [finetune_demo=gpu] [key=value ...]`."""
    budget = Budget.from_config(cfg.budget)
    try:
        table = run_proof(cfg, budget)
    except (BudgetSpent, Preempted) as stop:  # Preempted: a training stage checkpointed at its deadline
        why = "a training stage stopped at its deadline with a checkpoint" if isinstance(stop, Preempted) else stop
        done = sorted(p.parent.name for p in Path(cfg.dir).rglob("result.json"))
        print(f"\nbudget: {why}. Done: {', '.join(done) or 'nothing'}. The same command again skips the finished "
              f"stages and resumes a stopped one.", flush=True)
        return
    print("\n".join(["", *table, "", f"docs: {cfg.docs}"]), flush=True)


if __name__ == "__main__":
    main()
