"""sample.py's settings, checked against conf/ and against the training config its checkpoint stores, before
the model is rebuilt (a text model's rebuild loads its CLIP encoder)."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ldmlab.configs import CONF_DIR as CONF
from ldmlab.validate.classifier import classifier_problems
from ldmlab.validate.fields import get, target
from ldmlab.validate.files import checkpoint_problems
from ldmlab.validate.rules import missing_values, objective_problems


def stored_config(ckpt: str) -> DictConfig | None:
    """The resolved training config a train.py checkpoint stores (`ldmlab_config`), read without its tensors."""
    from ldmlab.nn.safe_load import load_weights_only

    try:
        stored = load_weights_only(ckpt, mmap=True).get("ldmlab_config")  # pickle only, tensors stay on disk
    except Exception:  # noqa: BLE001  # not a train.py checkpoint: load_ldm says so
        return None
    if not isinstance(stored, str):
        return None
    from ldmlab.lit.settings import upgrade  # a checkpoint from before model.diffusion reads as today's

    cfg = OmegaConf.create(stored)
    if isinstance(cfg.get("model"), DictConfig):
        upgrade(cfg.model)
    return cfg


def stored_guidance_problems(cfg: DictConfig, stored: DictConfig) -> list[str]:
    """guidance > 1 on a checkpoint whose training config had p_uncond = 0 (no unconditional prediction)."""
    guidance = cfg.get("guidance")
    p_uncond = get(stored, "model.training.p_uncond")
    p_uncond = get(stored, "model.p_uncond") if p_uncond is None else p_uncond  # checkpoints before model.training
    if guidance is None or guidance <= 1 or p_uncond != 0:
        return []
    line = (f"guidance={guidance} but {cfg.ckpt} was trained with model.training.p_uncond=0 (no condition dropout), so "
            "it has no unconditional prediction to guide away from: sample with guidance=1, or train with "
            "model.training.p_uncond>0")
    return [line]


def conditioning_problems(cfg: DictConfig, stored: DictConfig) -> list[str]:
    """prompt= and label= fit what the checkpoint is conditioned on (neither would be silently ignored)."""
    prompt, label, ckpt = cfg.get("prompt"), cfg.get("label"), cfg.ckpt
    kind = target(stored, "model.conditioner")
    guided = cfg.get("classifier") is not None  # label= then names the class the classifier guides towards
    if get(stored, "model.conditioner") is None:
        return [(f"{key}={value} but {ckpt} is unconditional (trained with model.conditioner=null), so it would be "
                 f"ignored: drop {key}=") for key, value in (("prompt", prompt), ("label", label))
                if value is not None and not (key == "label" and guided)]
    if cfg.get("embedding") is not None and not kind.endswith("TextConditioner"):
        return [(f"embedding={cfg.embedding} but {ckpt} is not text-conditional: a Textual Inversion token needs a "
                 "text model")]
    if kind.endswith("TextConditioner"):
        if label is not None and not guided:
            return [(f"label={label} but {ckpt} is text-conditional, so the label would be ignored: give "
                    f"prompt=\"...\" instead")]
        return [] if prompt is not None else [(f"prompt is null but {ckpt} is text-conditional: give "
                                              "prompt=\"a photo of a cat\"")]
    if not kind.endswith("ClassConditioner"):
        return []  # a conditioner this check does not know: the module judges its values
    n = get(stored, "model.conditioner.num_classes")
    classes = f"give label=<0..{n - 1}> (model.conditioner.num_classes={n}), or label=null to cycle through them"
    if prompt is not None:
        return [f"prompt={prompt!r} but {ckpt} is class-conditional, so the prompt would be ignored: {classes}"]
    if label is not None and (not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n):
        return [f"label={label} is not a class of {ckpt}: {classes}"]
    return []


def sample_problems(cfg: DictConfig) -> list[str]:
    """sample.py's settings against conf/ and against the checkpoint's stored training config."""
    problems = missing_values(cfg, "sample.py")
    for key in ("n", "batch_size", "steps"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value} must be a positive integer, e.g. {key}=16")
    samplers = sorted(p.stem for p in (CONF / "model" / "diffusion" / "sampler").glob("*.yaml"))
    if cfg.get("sampler") is not None and cfg.sampler not in samplers:
        problems.append(f"sampler={cfg.sampler} is unknown: valid are {', '.join(samplers)} (or null)")
    if cfg.get("compile", "auto") not in ("auto", "none", "regional", "full"):
        problems.append(f"compile={cfg.compile} is unknown: valid are auto, none, regional, full")
    lora = cfg.get("lora")
    if lora is not None and not (Path(str(lora)).is_file() and str(lora).endswith(".safetensors")):
        problems.append(f"lora={lora} not found: give a LoRA .safetensors file, e.g. <run>/export/unet_lora.safetensors")
    embedding = cfg.get("embedding")
    if embedding is not None and not Path(str(embedding)).is_file():
        problems.append(f"embedding={embedding} not found: give a Textual Inversion file, e.g. "
                        "<run>/export/learned_embeds.safetensors")
    ckpt = get(cfg, "ckpt")
    if ckpt is None:
        return problems
    if found := checkpoint_problems("ckpt", ckpt):  # missing, or a pickle that would run code
        return problems + found
    stored = stored_config(ckpt)
    if stored is None:
        return problems
    sampler = objective_problems(stored, cfg.sampler, "sampler") if cfg.get("sampler") in samplers else []
    return (problems + stored_guidance_problems(cfg, stored) + conditioning_problems(cfg, stored) + sampler
            + (image_problems(cfg, stored) or size_problems(cfg, stored)) + classifier_problems(cfg, stored))


def size_problems(cfg: DictConfig, stored: DictConfig) -> list[str]:
    """height= and width= are multiples of the checkpoint's total downsampling (VAE × U-Net), built on meta."""
    sizes = {k: cfg.get(k) for k in ("height", "width") if cfg.get(k) is not None}
    if bad := [f"{k}={v} must be a positive integer, e.g. {k}=512" for k, v in sizes.items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 1]:
        return bad
    if not sizes:
        return []
    from ldmlab.validate.networks import (  # torch: only if asked
        model_networks,
        nearest_multiple,
        total_factor,
    )

    unet, vae, _ = model_networks(stored)
    if unet is None or vae is None:
        return []  # the rebuild reports what is missing
    factor, why = total_factor(unet, vae)
    return [f"{k}={v} is not a multiple of {factor} ({why}): set {k}={nearest_multiple(v, factor)}"
            for k, v in sizes.items() if v % factor]


CONDITION_INPUTS = {"SuperResolution": "image=<low-res png> (noise_level= optional)",
                    "Inpainting": "image=<png> mask=<png of the same size, white = inpaint>"}


def image_problems(cfg: DictConfig, stored: DictConfig) -> list[str]:
    """image=, mask= and noise_level= fit the checkpoint's image condition (model.image_condition), the files
    exist, and the output size is one the networks take; before the model is rebuilt."""
    given = {k: cfg.get(k) for k in ("image", "mask", "noise_level") if cfg.get(k) is not None}
    kind = target(stored, "model.image_condition").rsplit(".", 1)[-1]
    if kind not in CONDITION_INPUTS:
        return [f"{k}={v} but {cfg.ckpt} has no image condition (model.image_condition=null), so it would be "
                f"ignored: drop {k}=" for k, v in given.items()]
    needs = "image" if kind == "SuperResolution" else "image and mask"
    model = "a super-resolution model" if kind == "SuperResolution" else "an inpainting model"
    unused = ("mask",) if kind == "SuperResolution" else ("noise_level",)
    if missing := [k for k in ("image", "mask")[: 1 if kind == "SuperResolution" else 2] if k not in given]:
        return [(f"{missing[0]} is null but {cfg.ckpt} is {model}: it needs {needs}, give "
                 f"{CONDITION_INPUTS[kind]}")]
    problems = [f"{k}={given[k]} is not used by {model}: drop it" for k in unused if k in given]
    problems += [f"{k}={cfg.get(k)}: an image-conditioned model's size follows image=; drop {k}="
                 for k in ("height", "width") if cfg.get(k) is not None]
    top = get(stored, "model.image_condition.max_noise_level")
    level = given.get("noise_level")
    if level is not None and (not isinstance(level, int) or not 0 <= level <= (top or 0)):
        problems.append(f"noise_level={level} must be an integer in [0, {top}] (model.image_condition."
                        f"max_noise_level of {cfg.ckpt}), e.g. noise_level=20")
    return problems + file_size_problems(cfg, stored, kind)


def _image_size(path: str) -> tuple[int, int] | str:
    """(H, W) of an image file from its header, or a one-line problem."""
    from PIL import Image

    if not Path(path).is_file():
        return "not found: give a PNG or JPEG file"
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
        return f"does not open as an image ({type(error).__name__}): give a PNG or JPEG file"


def file_size_problems(cfg: DictConfig, stored: DictConfig, kind: str) -> list[str]:
    """The files open; the mask has the image's size; the output sides divide by VAE × U-Net downsampling."""
    found = {k: _image_size(str(cfg[k])) for k in ("image", "mask") if cfg.get(k) is not None}
    if bad := [f"{k}={cfg[k]} {size}" for k, size in found.items() if isinstance(size, str)]:
        return bad
    sizes = {k: size for k, size in found.items() if isinstance(size, tuple)}
    (h, w), factor = sizes["image"], get(stored, "model.image_condition.factor") or 4
    if kind == "Inpainting" and sizes["mask"] != (h, w):
        mh, mw = sizes["mask"]
        return [f"mask={cfg.mask} is {mw}×{mh} px but image={cfg.image} is {w}×{h}: give a mask of the image's size"]
    from ldmlab.validate.networks import model_networks, total_factor  # torch: only if asked

    unet, vae, _ = model_networks(stored)
    if unet is None or vae is None:
        return []  # the rebuild reports what is missing
    total, why = total_factor(unet, vae)
    scale = factor if kind == "SuperResolution" else 1
    if (h * scale) % total == 0 and (w * scale) % total == 0:
        return []
    step = total // math.gcd(total, scale)  # the input side multiple that makes scale × side a multiple of total
    made = f" × factor {scale} = {w * scale}×{h * scale}" if scale > 1 else ""
    return [(f"image={cfg.image} is {w}×{h} px{made}, not a multiple of {total} ({why}): give an image whose "
             f"sides are multiples of {step}")]
