"""Several LDM variants at one step budget on ONE VAE, latent cache and judge (issue 22's comparison):
`python -m ldmlab.pipeline pipeline=variants_gpu` (or `variants` on the CPU, `variants_tiny` to rehearse).

    <dir>/vae, latents, classifier   the shared stages, as in every pipeline
    <dir>/variants/<name>/ldm        train.py with ldm.overrides + variants.runs.<name> + variants.each + ldm.extra
                                     + common, and a StepTimer (img/s)
    <dir>/variants/<name>/samples    the demo's samples stage: class accuracy, domain FID/KID on the judge's features
    <dir>/variants.md                one table, one row per variant (`variants_table`); results.json: every number

Every variant's config is composed and checked before the first stage runs. A finished variant is skipped on a
re-run; `variants.budget_s` stops between variants, so a comparison longer than one time-limited call is the same
command run again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldmlab.pipeline import stages
from ldmlab.pipeline.variants_table import write_table
from ldmlab.validate import ConfigError, check_config

log = logging.getLogger("ldmlab.pipeline")
RESULT = "result.json"
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a variant's name is a directory name


@dataclass
class Budget:
    """When to stop between variants: the next one starts if the time since `start` plus the longest finished
    variant's time fits in `seconds`. The first variant of a run always starts, so every run makes progress whatever
    the shared stages took (and a later check always has a finished variant to go by)."""

    seconds: float | None
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)
    started: int = 0

    def __post_init__(self) -> None:
        self.start = self.start or self.clock()

    def allows(self, durations: list[float]) -> bool:
        """Whether a variant expected to take as long as the longest of `durations` still fits."""
        if self.seconds is None or self.started == 0:
            return True
        return self.clock() - self.start + max(durations, default=0.0) <= self.seconds


def variant_overrides(cfg: DictConfig, name: str) -> list[str]:
    """One variant's train.py overrides: the preset's ldm.overrides, the variant's own, variants.each, then the
    user's ldm.extra and common (last: they win), and the variant's task name."""
    lists = [cfg.ldm.overrides, cfg.variants.runs[name], cfg.variants.each, cfg.ldm.get("extra"), cfg.get("common")]
    return [o for part in lists for o in _strings(part)] + [f"task_name={cfg.name}_{name}"]


def _strings(node: Any) -> list[str]:
    """A config list, resolved (or None: empty), as strings."""
    items = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return [str(o) for o in cast(list, items or [])]


def timer_overrides(out: Path, skip: int) -> list[str]:
    """A StepTimer in the LDM run that writes its steady-state seconds per step to `<out>/step_time.json`."""
    return ["++callbacks.step_timer._target_=ldmlab.callbacks.speed.StepTimer",
            f"++callbacks.step_timer.skip={skip}", f"++callbacks.step_timer.path='{out / 'step_time.json'}'"]


def settings_problems(cfg: DictConfig) -> list[str]:
    """The variants node's own values, one line each."""
    v, problems = cfg.variants, []
    if not v.runs:
        problems.append("variants.runs is empty: name at least one variant, e.g. 'variants.runs={baseline:[]}'")
    problems += [f"variants.runs.{n}: a variant's name is its directory: use letters, digits, '_' and '-'"
                 for n in v.runs if not NAME.match(str(n))]
    if v.budget_s is not None and v.budget_s < 0:
        problems.append(f"variants.budget_s={v.budget_s} must be >= 0 seconds, or null for no limit")
    if not 0 <= v.timer_skip < cfg.ldm.steps:
        problems.append(f"variants.timer_skip={v.timer_skip} leaves no timed step of ldm.steps={cfg.ldm.steps}: "
                        f"set variants.timer_skip to 0..{cfg.ldm.steps - 1}")
    return problems


class Comparison:
    """The variants of a pipeline config: composed and checked at construction (before any stage runs), then
    trained and scored one after the other by `run`."""

    def __init__(self, cfg: DictConfig, root: Path) -> None:
        self.cfg, self.root = cfg, root
        self.budget = Budget(cfg.variants.budget_s)
        problems = settings_problems(cfg)
        self.configs: dict[str, tuple[list[str], DictConfig]] = {}
        for name in cfg.variants.runs:
            out = self.dir(name) / "ldm"
            overrides = variant_overrides(cfg, name) + timer_overrides(out, int(cfg.variants.timer_skip))
            try:
                composed = stages.compose_stage(cfg, out, overrides)
            except (HydraException, OmegaConfBaseException) as error:  # e.g. a misspelt group option
                said = " ".join(str(error).split("Config search path")[0].split())  # Hydra's words, one line
                problems.append(f"variants.runs.{name}: {said}")
                continue
            problems += [f"variants.runs.{name}: {line}" for line in check_config(composed, files=False)]
            self.configs[name] = (overrides, composed)
        if problems:
            raise ConfigError(problems)

    def dir(self, name: str) -> Path:
        return self.root / "variants" / name

    def finished(self, name: str) -> bool:
        """Whether both of the variant's stages (ldm, samples) have written their result."""
        return all((self.dir(name) / stage / RESULT).is_file() for stage in ("ldm", "samples"))

    def run(self, shared: dict[str, dict], vae_cfg: DictConfig, run_stage: Callable[..., dict]) -> Path:
        """Train and score each variant not finished yet, as the budget allows; write the table; return its path.
        `shared`: the vae, latents and classifier stages' results; `run_stage`: the pipeline's (ldmlab.pipeline.run)."""
        # finished variants first, through run_stage: skipped when their settings are today's, refused (naming
        # what to delete) when not, before anything trains
        done = {n: self.run_variant(n, shared, vae_cfg, run_stage) for n in self.configs if self.finished(n)}
        pending: list[str] = []
        for name in self.configs:
            if name in done:
                continue
            if pending or not self.budget.allows([seconds(r) for r in done.values()]):
                pending.append(name)
                continue
            self.budget.started += 1
            done[name] = self.run_variant(name, shared, vae_cfg, run_stage)
        if pending:
            log.info("variants.budget_s=%s reached: %d variant(s) left (%s); run the same command again",
                     self.cfg.variants.budget_s, len(pending), ", ".join(pending))
        results = {**shared, "variants": {n: done[n] for n in self.configs if n in done}, "pending": pending}
        results["overrides"] = {n: list(self.cfg.variants.runs[n]) for n in self.configs}
        (self.root / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return write_table(self.root, results, title=str(self.cfg.name))

    def run_variant(self, name: str, shared: dict[str, dict], vae_cfg: DictConfig,
                    run_stage: Callable[..., dict]) -> dict[str, dict]:
        """One variant's LDM stage (with its img/s) and samples stage."""
        overrides, ldm_cfg = self.configs[name]
        vdir, names = self.dir(name), shared["vae"]["class_names"]
        vae_path = self.root / "vae" / "export" / "vae.safetensors"
        log.info("[variant %s] %s", name, " ".join(self.cfg.variants.runs[name]) or "(the preset's LDM)")
        ldm = run_stage(vdir / "ldm", {"overrides": overrides, "after": {"latents": shared["latents"]["finished"]}},
                        lambda out: ldm_with_speed(ldm_cfg, out, overrides))
        spec = {**cast(dict, OmegaConf.to_container(self.cfg.sample, resolve=True)), "seed": self.cfg.seed,
                "after": {"ldm": ldm["finished"], "classifier": shared["classifier"]["finished"]}}
        samples = run_stage(vdir / "samples", spec, lambda out: stages.samples_stage(
            self.cfg, ldm_cfg.trainer, out, vdir / "ldm" / "checkpoints" / "last.ckpt",
            self.root / "classifier" / "classifier.safetensors", names, vae_cfg.data, vae_path))
        return {"ldm": ldm, "samples": samples}


def ldm_with_speed(cfg: DictConfig, out: Path, overrides: list[str]) -> dict[str, Any]:
    """The pipeline's LDM stage, plus the steady-state training rate its StepTimer measured (img/s)."""
    result = stages.ldm_stage(cfg, out, overrides)
    timing = json.loads((out / "step_time.json").read_text())
    per_step = timing["seconds_per_step"]
    result.update(seconds_per_step=per_step, timed_steps=timing["steps"], timer_skip=timing["skip"],
                  img_per_s=result["batch_size"] / per_step if per_step else None)
    return result


def seconds(variant: dict[str, dict]) -> float:
    """A finished variant's wall time: its LDM and samples stages, every attempt."""
    return float(variant["ldm"].get("seconds", 0.0)) + float(variant["samples"].get("seconds", 0.0))
