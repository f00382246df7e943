"""Rules across config groups and mandatory values: `???` left unset, guidance vs condition dropout, objective vs
sampler, batch vs world size, FSDP vs EMA; one line each, naming the field and the fix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldmlab.messages import EMA_UNDER_FSDP
from ldmlab.validate.fields import get, target, world_size

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


def finetune_problems(cfg: DictConfig) -> list[str]:
    """A fine-tune adapts a latent diffusion U-Net (a model without one would fail on an unknown argument);
    Textual Inversion and a text-encoder LoRA also need the model's text encoder."""
    if get(cfg, "model.finetune") is None:
        return dreambooth_problems(cfg, False)
    kind = target(cfg, "model.finetune").rsplit(".", 1)[-1]
    if get(cfg, "model.unet") is None:
        return [(f"model.finetune is set ({kind}) but model {get(cfg, 'model._target_')} has no U-Net to adapt: "
                 "use a latent diffusion model (model=unet_small, model=unet_sd15) or finetune=full")]
    what = {"TextualInversion": "finetune=textual_inversion", "DreamBooth": "finetune=dreambooth"}.get(
        kind, "model.finetune.text_encoder=true")
    needs_text = kind in ("TextualInversion", "DreamBooth") or bool(get(cfg, "model.finetune.text_encoder"))
    if needs_text and not target(cfg, "model.conditioner").endswith("TextConditioner"):
        return [(f"{what} needs prompts: it trains with or for a text encoder, but model.conditioner is "
                 f"{target(cfg, 'model.conditioner') or 'null'}: use a text-conditioned model (model.conditioner: "
                 "TextConditioner with a CLIP path)")]
    return dreambooth_problems(cfg, kind == "DreamBooth")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what make_shards reads (data.make_shards pulls in torch)


def dreambooth_problems(cfg: DictConfig, dreambooth: bool) -> list[str]:
    """finetune=dreambooth and data=dreambooth go together; the instance folder holds images."""
    paired = target(cfg, "data").endswith("DreamBoothData")
    if dreambooth != paired:
        return ["finetune=dreambooth trains on data=dreambooth (instance photos + class images): pass both"
                if dreambooth else "data=dreambooth feeds finetune=dreambooth: pass both"]
    src = get(cfg, "data.instance.source.src") if dreambooth else None
    if not dreambooth or (src is not None and Path(str(src)).is_file()):
        return []  # a .jsonl manifest: make_shards checks its rows
    images = [p for p in Path(str(src)).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES] if src else []
    if not images:
        found = "not set" if src is None else "no .jpg/.png/.webp images there"
        return [f"data.instance.source.src={src}: {found}; give the folder of the subject's photos (3-5 are enough)"]
    return []


def guidance_problems(cfg: DictConfig) -> list[str]:
    """Classifier-free guidance > 1 needs a model that also learned the unconditional prediction."""
    scales, p_uncond = get(cfg, "model.sampling.guidance_scales"), get(cfg, "model.training.p_uncond")
    if p_uncond != 0 or not scales or all(s <= 1 for s in scales):
        return []
    line = (f"model.sampling.guidance_scales={list(scales)} has scales > 1 but model.training.p_uncond=0: without "
            "condition dropout the model never learns the unconditional prediction that guidance extrapolates from; "
            "set model.training.p_uncond=0.1 or model.sampling.guidance_scales=[1.0]")
    return [line]


def objective_problems(cfg: DictConfig, sampler: str | None = None,
                       where: str = "model/diffusion/sampler") -> list[str]:
    """The flow-matching objective (model/diffusion/prediction=flow) samples with the flow samplers, and they with
    it only: a DDPM-family sampler would read its velocity as ε, v or x0 on a VP schedule. `sampler`: a sample.py
    choice (the name of a conf/model/diffusion/sampler file) instead of the config's own."""
    if get(cfg, "model.diffusion.prediction") is None or (sampler is None and
                                                          get(cfg, "model.diffusion.sampler") is None):
        return []
    flow = target(cfg, "model.diffusion.prediction").endswith("FlowMatching")
    name = sampler or target(cfg, "model.diffusion.sampler").rsplit(".", 1)[-1]
    flow_sampler = name.startswith("flow_")  # conf/model/diffusion/sampler/flow_*.yaml: diffusion.flow_samplers
    if flow and not flow_sampler:
        return [(f"{where}={name.removesuffix('_sample')} cannot sample the flow-matching objective "
                 f"(model/diffusion/prediction=flow predicts a velocity): use {where}=flow_euler or "
                 f"{where}=flow_heun")]
    if flow_sampler and not flow:
        retrain = "model/diffusion/prediction=flow"
        retrain = f"train with {retrain}" if where == "sampler" else retrain
        return [(f"{where}={name.removesuffix('_sample')} integrates a velocity, but model/diffusion/prediction is "
                 f"{target(cfg, 'model.diffusion.prediction').rsplit('.', 1)[-1]}: use "
                 f"{where}=ddim|ddpm|euler|dpmpp_2m, "
                 f"or {retrain}")]
    return []


def variance_problems(cfg: DictConfig) -> list[str]:
    """A learned variance (Improved DDPM) is a Gaussian reverse step on a noise schedule: flow matching has neither."""
    if not target(cfg, "model.diffusion.variance").endswith("LearnedVariance"):
        return []
    if target(cfg, "model.diffusion.prediction").endswith("FlowMatching"):
        return [("model/diffusion/variance=learned cannot train with model/diffusion/prediction=flow (its VLB is the "
                 "KL of DDPM's Gaussian reverse steps; flow matching integrates a velocity ODE): use "
                 "model/diffusion/variance=fixed, or model/diffusion/prediction=eps|v|x0")]
    return []
# an image condition's data decoder: what makes the batch entries it reads (ldmlab.data.conditions)
CONDITION_DECODERS = {"SuperResolution": ("LowResDecoder", "data=demo_sr"),
                      "Inpainting": ("InpaintDecoder", "data=demo_inpaint")}


def image_condition_problems(cfg: DictConfig) -> list[str]:
    """model.image_condition reads what its data decoder makes (low-res crops at its factor, masks), a
    noise-augmented super-resolution condition reaches a U-Net with a noise-level embedding, and eval=psnr has an
    image condition to score."""
    kind = target(cfg, "model.image_condition").rsplit(".", 1)[-1]
    if kind not in CONDITION_DECODERS:
        return [("eval=psnr scores an image-conditioned model, but model.image_condition is null: drop eval=psnr or "
                "set model/image_condition=super_resolution | inpainting")] if get(cfg, "callbacks.condition_psnr") else []
    decoder, example = CONDITION_DECODERS[kind]
    problems = []
    if not target(cfg, "data.decoder").endswith(decoder):
        problems.append(f"model.image_condition is {kind} but data.decoder is {target(cfg, 'data.decoder') or 'null'}"
                        f", which makes no condition images (a latent cache has no pixels): use {example} or "
                        f"data.decoder._target_=ldmlab.data.conditions.{decoder}")
    elif kind == "SuperResolution" and get(cfg, "data.decoder.factor") != get(cfg, "model.image_condition.factor"):
        problems.append(f"data.decoder.factor={get(cfg, 'data.decoder.factor')} (the low-res crops) differs from "
                        f"model.image_condition.factor={get(cfg, 'model.image_condition.factor')}: set both alike")
    if kind == "SuperResolution":
        augments = (get(cfg, "model.image_condition.max_noise_level") or 0) > 0
        if bool(get(cfg, "model.unet.noise_level_embed")) != augments:
            problems.append(f"model.image_condition.max_noise_level={get(cfg, 'model.image_condition.max_noise_level')}"
                            f" but model.unet.noise_level_embed={get(cfg, 'model.unet.noise_level_embed')}: the U-Net "
                            f"embeds the augmentation level exactly when there is one; set "
                            f"model.unet.noise_level_embed={str(augments).lower()}")
    return problems


def train_samples(cfg: DictConfig) -> int | None:
    """Samples in one training epoch when known without reading data (demo spec, manifests), else None."""
    if get(cfg, "data.samples_per_epoch") is not None:
        return get(cfg, "data.samples_per_epoch")
    if target(cfg, "data.source").endswith("DemoShards"):
        from ldmlab.data.demo import class_names

        return len(class_names(bool(get(cfg, "data.source.grayscale")))) * get(cfg, "data.source.crops_per_image")
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

