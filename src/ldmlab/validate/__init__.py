"""Config checks that run before anything heavy, one line per problem naming the config field and a fix.

`validate_config` runs first in `ldmlab.run.train` (before data, weights or the Trainer are built, so a typo
costs seconds, not a shard build or a DDP launch); `validate_sample` first in `ldmlab.sample.sample`;
`exit_on_bad_overrides` in train.py before `hydra.main`, because Hydra reports an unknown group option
(`model=unet_foo`) in its own multi-line error before any of our code runs. Nothing here imports diffusers or
reads tensor data: weight files are inspected through their metadata, JSON configs, or a memory-mapped
weights-only load of the pickle (which also refuses files that would run code, before the run starts).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from ldmlab.configs import CONF_DIR as CONF
from ldmlab.validate.fields import get, target, world_size
from ldmlab.validate.files import checkpoint_problems, data_problems, weight_problems
from ldmlab.validate.shapes import latent_problems, vae_problems

# Hydra flags that choose another config tree: the override check then stands aside
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


class ConfigError(ValueError, CompactHydraException):
    """Config problems, one line each; a CompactHydraException, so Hydra prints them without a traceback."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------- mandatory values


def _missing_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _missing_paths(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _missing_paths(value, f"{prefix}{i}.")
    elif node == "???":
        yield prefix[:-1]


def missing_values(cfg: DictConfig, entry: str = "train.py") -> list[str]:
    """Every `???` left unset, with the override that sets it."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    return [f"{key} is mandatory (???) and unset: give it on the command line, e.g. "
            f"python {entry} {key}=<value>" for key in _missing_paths(plain) if not key.startswith("hydra.")]


# ---------------------------------------------------------------- guidance, batches


def guidance_problems(cfg: DictConfig) -> list[str]:
    """Classifier-free guidance > 1 needs a model that also learned the unconditional prediction."""
    scales, p_uncond = get(cfg, "model.guidance_scales"), get(cfg, "model.p_uncond")
    if p_uncond != 0 or not scales or all(s <= 1 for s in scales):
        return []
    line = (f"model.guidance_scales={list(scales)} has scales > 1 but model.p_uncond=0: without condition "
            "dropout the model never learns the unconditional prediction that guidance extrapolates from; "
            "set model.p_uncond=0.1 or model.guidance_scales=[1.0]")
    return [line]


def train_samples(cfg: DictConfig) -> int | None:
    """Samples in one training epoch when known without reading data (demo spec, manifests), else None."""
    if get(cfg, "data.samples_per_epoch") is not None:
        return get(cfg, "data.samples_per_epoch")
    if target(cfg, "data").endswith("DemoDataModule"):
        from ldmlab.data.demo import class_names

        return len(class_names(bool(get(cfg, "data.grayscale")))) * get(cfg, "data.crops_per_image")
    root = get(cfg, "data.root")
    if root is not None and (Path(root) / "manifest.json").is_file():
        counts = json.loads((Path(root) / "manifest.json").read_text()).get("counts", {})
        return sum(n for name, n in counts.items() if name.startswith("train-")) or None
    return None


def batch_problems(cfg: DictConfig) -> list[str]:
    """data.batch_size >= 1, and an epoch gives every rank at least one whole batch (drop_last)."""
    batch = get(cfg, "data.batch_size")
    if batch is None:
        return []
    if not isinstance(batch, int) or batch < 1:
        return [f"data.batch_size={batch} must be a positive integer (per device), e.g. data.batch_size=16"]
    world, samples = world_size(cfg), train_samples(cfg)
    if world is None or samples is None or samples >= world * batch:
        return []
    devices, nodes = get(cfg, "trainer.devices"), get(cfg, "trainer.num_nodes") or 1
    line = (f"data.batch_size={batch} x {world} ranks (trainer.devices={devices} x "
            f"trainer.num_nodes={nodes}) = {world * batch} samples per step, more than the {samples} samples "
            f"of an epoch, so no rank gets a whole batch: set data.batch_size<={max(samples // world, 1)}, "
            "fewer devices, or data.samples_per_epoch")
    return [line]


def fsdp_problems(cfg: DictConfig) -> list[str]:
    """FSDP needs GPUs (Lightning's FSDPStrategy); the EMA callback copies each rank's parameters, which under
    FSDP on several ranks are shards."""
    strategy = get(cfg, "trainer.strategy")
    sharded = "fsdp" in (target(cfg, "trainer.strategy") if hasattr(strategy, "keys") else str(strategy)).lower()
    if not sharded:
        return []
    problems = []
    if str(get(cfg, "trainer.accelerator")) == "cpu":
        problems.append("trainer=fsdp with trainer.accelerator=cpu: Lightning's FSDP runs on GPUs only; on the CPU "
                        "use trainer=ddp trainer.accelerator=cpu trainer.precision=32-true (gloo)")
    world = world_size(cfg)
    if world not in (None, 1) and target(cfg, "callbacks.ema"):
        problems.append(EMA_UNDER_FSDP.format(where=f"trainer.devices x trainer.num_nodes = {world}"))
    return problems


EMA_UNDER_FSDP = ("callbacks.ema with trainer=fsdp on {where} ranks: each rank's EMA would hold only its parameter "
                  "shard and checkpoints only rank 0's; use trainer=ddp (SD1.5 with AdamW and EMA fits one 80 GB "
                  "GPU) or callbacks.ema=null")


# ---------------------------------------------------------------- entry points


def check_config(cfg: DictConfig, entry: str = "train.py") -> list[str]:
    """Every problem of a composed train config, one line each ([] when it is fine)."""
    missing = missing_values(cfg, entry)
    rules = (data_problems, weight_problems, vae_problems, latent_problems, guidance_problems, batch_problems,
             fsdp_problems)
    return missing + [line for rule in rules for line in rule(cfg)]


def validate_config(cfg: DictConfig, entry: str = "train.py") -> None:
    """Raise ConfigError listing every problem of `cfg` (before any data, weights or trainer are built)."""
    if problems := check_config(cfg, entry):
        raise ConfigError(problems)


def sample_problems(cfg: DictConfig) -> list[str]:
    """sample.py's settings against conf/ and against the checkpoint's stored training config."""
    problems = missing_values(cfg, "sample.py")
    for key in ("n", "batch_size", "steps"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value} must be a positive integer, e.g. {key}=16")
    samplers = sorted(p.stem for p in (CONF / "model" / "sampler").glob("*.yaml"))
    if cfg.get("sampler") is not None and cfg.sampler not in samplers:
        problems.append(f"sampler={cfg.sampler} is unknown: valid are {', '.join(samplers)} (or null)")
    if cfg.get("compile", "auto") not in ("auto", "none", "regional", "full"):
        problems.append(f"compile={cfg.compile} is unknown: valid are auto, none, regional, full")
    ckpt = get(cfg, "ckpt")
    if ckpt is None:
        return problems
    found = checkpoint_problems("ckpt", ckpt)  # missing, or a pickle that would run code
    return problems + (found or _stored_guidance_problems(ckpt, cfg.get("guidance")))


def _stored_guidance_problems(ckpt: str, guidance: float) -> list[str]:
    """guidance > 1 on a checkpoint whose training config had p_uncond = 0 (no unconditional prediction)."""
    from ldmlab.nn.safe_load import load_weights_only

    if guidance is None or guidance <= 1:
        return []
    try:
        stored = load_weights_only(ckpt, mmap=True).get("ldmlab_config")  # pickle only, tensors stay on disk
    except Exception:  # noqa: BLE001  # not a train.py checkpoint: load_ldm says so
        return []
    if not isinstance(stored, str) or get(OmegaConf.create(stored), "model.p_uncond") != 0:
        return []
    line = (f"guidance={guidance} but {ckpt} was trained with model.p_uncond=0 (no condition dropout), so "
            "it has no unconditional prediction to guide away from: sample with guidance=1, or train with "
            "model.p_uncond>0")
    return [line]


def validate_sample(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem of a sample.py config (before the model is rebuilt)."""
    if problems := sample_problems(cfg):
        raise ConfigError(problems)


# ---------------------------------------------------------------- unknown group options on the command line


def _choices(override: Any) -> list[str]:
    """The option names one parsed override selects (a sweep selects several; null selects none)."""
    if override.is_choice_sweep():
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001  # glob(...) sweeps need Hydra's config loader: let Hydra check them
            return []
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None]


def override_problems(args: Sequence[str], conf_dir: Path = CONF) -> list[str]:
    """`group=option` overrides whose option has no conf/<group>/<option>.yaml, with the valid options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=")[0] in CONFIG_FLAGS for a in args):
        return []
    try:
        overrides = [a for a in args if "=" in a and not a.startswith("-")]
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001  # a syntax error: Hydra's own message says where
        return []
    problems = []
    for override in parsed:
        group = override.key_or_group
        if override.is_delete() or override.is_hydra_override() or not (conf_dir / group).is_dir():
            continue
        valid = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        listed = ", ".join(valid) or "(none)"
        problems += [f"{group}={choice}: no such option in conf/{group}/; valid: {listed}"
                     for choice in _choices(override) if choice not in valid]
    return problems


def exit_on_bad_overrides(conf_dir: Path = CONF, argv: Sequence[str] | None = None) -> None:
    """Exit with one line per unknown group option, before `hydra.main` prints its multi-line error."""
    if problems := override_problems(sys.argv[1:] if argv is None else argv, conf_dir):
        sys.exit("\n".join(problems))
