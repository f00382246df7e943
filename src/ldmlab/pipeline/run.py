"""The pipeline runner: stages in order, each skipped when its `result.json` exists, then the report.

A stage's settings (its resolved overrides or parameters, plus when the stages it reads finished) are its
`spec`. A finished stage with the same spec is skipped; a stage interrupted half-way continues (training
resumes from its run dir's newest checkpoint, the latent cache skips finished shards); a stage whose spec
changed is refused with a message naming what to delete, so a changed preset never silently mixes with old
outputs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ldmlab.pipeline import stages
from ldmlab.pipeline.report import write_report
from ldmlab.pipeline.variants import Comparison

log = logging.getLogger("ldmlab.pipeline")
RESULT, SPEC = "result.json", "spec.json"
# what each stage reads: a stage redone makes the stages that read it stale
DEPENDS = {"vae": [], "latents": ["vae"], "ldm": ["latents"], "classifier": ["vae"],
           "samples": ["ldm", "classifier"]}
PER_VARIANT = ("ldm", "samples")  # a comparison of variants runs these once per variant, under variants/<name>/


class StageMismatch(RuntimeError):
    """A stage dir holds outputs made with other settings than the current ones."""


def _json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples → lists), so stored and current specs compare equal."""
    return json.loads(json.dumps(obj))


def _write_json(path: Path, obj: Any) -> None:
    """Write atomically: a crash leaves the old file or none, never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def dependents(stage: str) -> list[str]:
    """The stages that read `stage`'s outputs, directly or through others, in pipeline order."""
    found = {s for s, deps in DEPENDS.items() if stage in deps}
    for s in list(found):
        found.update(dependents(s))
    return [s for s in DEPENDS if s in found]


def _refuse(out: Path, old: dict, new: dict) -> StageMismatch:
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    stale = " ".join(str(out.parent / s) for s in [out.name, *dependents(out.name)])
    return StageMismatch(f"{out} was made with different {diff} ('after' = an input stage was redone): "
                         f"to redo it, `rm -r {stale}`; or give another dir=")


def run_stage(out: Path, spec: dict, fn: Callable[[Path], dict]) -> dict:
    """Run one stage into `out` unless its result for this `spec` exists; returns the result."""
    spec, done = _json(spec), out / RESULT
    if done.is_file():
        result = json.loads(done.read_text())
        if result["spec"] != spec:
            raise _refuse(out, result["spec"], spec)
        log.info("[%s] done before (%s): skipped", out.name, done)
        return result
    out.mkdir(parents=True, exist_ok=True)
    if (out / SPEC).is_file() and (old := json.loads((out / SPEC).read_text())) != spec:
        raise _refuse(out, old, spec)  # a half-finished stage from other settings: do not resume it
    _write_json(out / SPEC, spec)
    log.info("[%s] running into %s", out.name, out)
    start = time.perf_counter()
    try:
        result = _json(fn(out))
    finally:  # an interrupted attempt's time counts too: the stage's seconds are those of all its attempts
        seconds = _add_seconds(out, time.perf_counter() - start)
    result.update(stage=out.name, spec=spec, seconds=round(seconds, 1),
                  finished=datetime.now().isoformat(timespec="seconds"))
    _write_json(done, result)
    return result


def _add_seconds(out: Path, seconds: float) -> float:
    """Add `seconds` to the stage's running total in `<out>/seconds.json`; returns the new total."""
    path = out / "seconds.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    _write_json(path, {"seconds": total})
    return total


def resolve_dir(cfg: DictConfig) -> Path:
    """The pipeline dir as an absolute path, written back so `${dir}` in the stage overrides is absolute too."""
    root = Path(cfg.dir).expanduser().resolve()
    with open_dict(cfg):
        cfg.dir = str(root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def overrides(cfg: DictConfig, stage: str) -> list[str]:
    """A training stage's train.py overrides (the preset's, its `extra`, then `common`), resolved."""
    lists = [cfg[stage].overrides, cfg[stage].get("extra", []), cfg.common]
    return [str(o) for part in lists for o in OmegaConf.to_container(part, resolve=True)]


Step = tuple[str, dict, Callable[[Path], dict]]  # (stage, its settings, what it does)


def vae_step(vae_cfg: DictConfig, vae_ov: list[str]) -> Step:
    """The VAE stage: `vae_cfg` (composed from `vae_ov`) trained into <dir>/vae."""
    return "vae", {"overrides": vae_ov}, lambda out: stages.vae_stage(vae_cfg, out, vae_ov)


def classifier_step(cfg: DictConfig, vae_cfg: DictConfig, trainer: DictConfig, vae_path: Path) -> Step:
    """The judge: a classifier of the VAE stage's real crops, on `trainer`'s device and precision."""
    return ("classifier", {**_plain(cfg.classifier), "seed": cfg.seed},
            lambda out: stages.classifier_stage(cfg, vae_cfg, trainer, out, vae_path))


def run_plan(root: Path, plan: list[Step], r: dict, guard: Callable[[str, Callable], Callable] | None = None,
             depends: dict[str, list[str]] = DEPENDS) -> dict:
    """Run each stage of `plan` into root/<stage> (skipped when done), adding its result to `r`; a stage's spec
    gets when the stages it reads (`depends`) finished. `guard(stage, fn)` may wrap what a stage does."""
    for name, spec, fn in plan:
        after = {d: r[d]["finished"] for d in depends[name]}
        r[name] = run_stage(root / name, {**spec, "after": after}, guard(name, fn) if guard else fn)
    return r


def run_pipeline(cfg: DictConfig) -> Path:
    """VAE → latent cache → LDM → classifier → samples → report; returns the report's path. With a `variants` node
    (pipeline=variants_gpu): VAE → latent cache → classifier, then the LDM and samples stages once per variant
    (ldmlab.pipeline.variants), and the comparison's table instead of the report."""
    root = resolve_dir(cfg)
    # every variant composed and checked before the first stage runs: a bad override costs seconds, not a VAE
    comparison = Comparison(cfg, root) if cfg.get("variants") is not None else None
    vae_ov, ldm_ov = overrides(cfg, "vae"), overrides(cfg, "ldm")
    vae_cfg = stages.compose_stage(cfg, root / "vae", vae_ov)
    ldm_cfg = stages.compose_stage(cfg, root / "ldm", ldm_ov)
    vae_path, r = root / "vae" / "export" / "vae.safetensors", {}
    plan: list[Step] = [
        vae_step(vae_cfg, vae_ov),
        ("latents", _plain(cfg.latents), lambda out: stages.latents_stage(cfg, vae_cfg, out, vae_path)),
        ("ldm", {"overrides": ldm_ov}, lambda out: stages.ldm_stage(ldm_cfg, out, ldm_ov)),
        classifier_step(cfg, vae_cfg, ldm_cfg.trainer, vae_path),
        ("samples", {**_plain(cfg.sample), "seed": cfg.seed},
         lambda out: stages.samples_stage(cfg, ldm_cfg.trainer, out, root / "ldm" / "checkpoints" / "last.ckpt",
                                          root / "classifier" / "classifier.safetensors",
                                          r["vae"]["class_names"], vae_cfg.data, vae_path)),
    ]
    if comparison is not None:  # the LDM and its samples run once per variant, in the comparison
        run_plan(root, [step for step in plan if step[0] not in PER_VARIANT], r)
        return comparison.run(r, vae_cfg, run_stage)
    run_plan(root, plan, r)
    _write_json(root / "results.json", r)
    return write_report(root, r, title=str(cfg.name))


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)
