"""sample.py classifier=... classifier_scale=...: the guiding classifier against the LDM checkpoint, before either
is loaded. An exported classifier records its architecture, the latent shape and scale it was trained on and its
noise path (lit.noisy_classifier); the LDM checkpoint its training config, latent shape and latent scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldmlab.validate.fields import get, target

SCALE_TOLERANCE = 0.05  # relative: two 1/std estimates of one latent distribution agree far closer than this
TRAIN_CLASSIFIER = "python train.py experiment=classifier_demo"


def _ldm_record(ckpt: str) -> dict[str, Any]:
    """The LDM checkpoint's latent shape, latent scale and VAE config (memory-mapped: one scalar is read)."""
    from ldmlab.nn.safe_load import load_weights_only

    raw = load_weights_only(ckpt, mmap=True)
    scale = raw.get("state_dict", {}).get("latent_scale")
    return {"latent_shape": raw.get("latent_shape"), "vae_config": raw.get("vae_config"),
            "latent_scale": float(scale) if scale is not None else None}


def _noise_path(stored: DictConfig) -> str | None:
    """The LDM's forward process as its objective names it (the schedule, or flow), None if not rebuildable."""
    import hydra

    try:
        prediction = hydra.utils.instantiate(get(stored, "model.diffusion.prediction"))
        schedule = hydra.utils.instantiate(get(stored, "model.diffusion.noise_schedule"))
        return str(prediction.noise_path(schedule))
    except Exception:  # noqa: BLE001  # an older or foreign config: the rebuild reports it
        return None


def _sampled_shape(cfg: DictConfig, record: dict[str, Any]) -> tuple[int, ...] | None:
    """(C, h, w) sample.py will draw: the training latent shape, or height= / width= through the VAE's factor."""
    shape = record["latent_shape"]
    if shape is None:
        return None
    vae = record["vae_config"] or {}
    f = 2 ** (len(vae["channel_mult"]) - 1) if "channel_mult" in vae else None
    h, w = cfg.get("height"), cfg.get("width")
    if f is None or (h is None and w is None):
        return tuple(shape)
    return int(shape[0]), (h // f if h else shape[1]), (w // f if w else shape[2])


def _class_problems(cfg: DictConfig, stored: DictConfig, classes: int) -> list[str]:
    """Labels the classifier can score: the class LDM's count, label= in range, a label for a text LDM."""
    path, kind, label = cfg.classifier, target(stored, "model.conditioner"), cfg.get("label")
    ldm_classes = get(stored, "model.conditioner.num_classes")
    if kind.endswith("ClassConditioner") and ldm_classes != classes:
        return [(f"classifier={path} has {classes} classes but {cfg.ckpt} has model.conditioner.num_classes="
                 f"{ldm_classes}: train the classifier on the LDM's classes (model.classifier.num_classes={ldm_classes})")]
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < classes):
        return [f"label={label} is not a class of classifier={path}: give label=<0..{classes - 1}>"]
    if kind.endswith("TextConditioner") and label is None:
        return [(f"classifier={path} guides towards a class label, but {cfg.ckpt} is text-conditional: give "
                 f"label=<0..{classes - 1}> (the classifier's class for every image)")]
    return []


def classifier_problems(cfg: DictConfig, stored: DictConfig) -> list[str]:
    """classifier= exists, is an exported classifier, and fits the LDM's classes, latents and noise path."""
    from ldmlab.lit.noisy_classifier import classifier_metadata

    path, scale = cfg.get("classifier"), cfg.get("classifier_scale", 1.0)
    if path is None:
        return []
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        return [f"classifier_scale={scale} must be a number >= 0 (ADM: 1 to 10; 0 = no guidance)"]
    if not Path(str(path)).is_file():
        return [f"classifier={path} not found: give a classifier run's export/classifier.safetensors ({TRAIN_CLASSIFIER})"]
    try:
        meta = classifier_metadata(path)
    except Exception as error:  # noqa: BLE001  # not ours, or not safetensors: one line
        return [f"classifier={path}: {str(error).splitlines()[0]}"]
    problems = _class_problems(cfg, stored, meta["config"]["num_classes"])
    record = _ldm_record(cfg.ckpt)
    sampled, trained = _sampled_shape(cfg, record), meta["latent_shape"]
    if sampled is not None and trained is not None and tuple(sampled) != tuple(trained):
        problems.append(f"classifier={path} was trained on {tuple(trained)} latents but {cfg.ckpt} samples "
                        f"{tuple(sampled)}: train the classifier on latents of this shape")
    ldm_path = _noise_path(stored)
    if ldm_path is not None and meta["noise_path"] not in (None, ldm_path):
        problems.append(f"classifier={path} was trained on noise path {meta['noise_path']} but {cfg.ckpt} samples "
                        f"{ldm_path}: train it with the LDM's model/diffusion/noise_schedule and "
                        "model/diffusion/prediction")
    ours, theirs = meta["latent_scale"], record["latent_scale"]
    if ours and theirs and abs(ours - theirs) > SCALE_TOLERANCE * theirs:
        problems.append(f"classifier={path} saw latents scaled by {ours:.5f} but {cfg.ckpt} uses {theirs:.5f}: "
                        f"retrain the classifier with model.latent_scale={theirs:.5f}")
    return problems
