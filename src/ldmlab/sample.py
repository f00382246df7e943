"""Rebuild a LatentDiffusionModule from a checkpoint written by train.py and sample an image grid."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldmlab import accel
from ldmlab.configs import CONF_DIR as CONF
from ldmlab.data.transforms import to_tensor
from ldmlab.diffusion import classifier_gradient, classifier_guidance
from ldmlab.finetune.lora import set_lora_scale
from ldmlab.finetune.lora_formats import load_lora_file, lora_components
from ldmlab.finetune.textual_inversion import load_learned_embeds
from ldmlab.lit.conditioning import ClassConditioner, TextConditioner
from ldmlab.lit.image_condition import SuperResolution
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.lit.noisy_classifier import load_classifier
from ldmlab.lit.settings import regroup
from ldmlab.nn.safe_load import load_weights_only
from ldmlab.utils.images import make_grid, save_png
from ldmlab.validate import validate_sample


def load_ldm(ckpt_path: str | Path, use_ema: bool = True) -> LatentDiffusionModule:
    """The module of a train.py checkpoint, VAE rebuilt from its stored architecture, EMA weights if asked."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"checkpoint '{ckpt_path}' not found: give ckpt=<run dir>/checkpoints/last.ckpt")
    ckpt = load_weights_only(ckpt_path)  # never runs code from the file: one-line refusal instead
    if "ldmlab_config" not in ckpt or "unet_config" not in ckpt:
        raise ValueError(f"{ckpt_path} carries no ldmlab config: not a LatentDiffusionModule checkpoint from train.py")
    model_cfg = regroup(OmegaConf.create(ckpt["ldmlab_config"]).model)  # older checkpoints: flat keys
    if "vae_config" in ckpt:  # weights come from the checkpoint: the original VAE file need not exist
        model_cfg.vae = {"_target_": "ldmlab.nn.autoencoder.AutoencoderKL", **ckpt["vae_config"]}
    if model_cfg.get("training", {}).get("unet_init"):  # the U-Net's weights come from the checkpoint too: the
        model_cfg.training.unet_init = None  # init file need not exist
    module: LatentDiffusionModule = hydra.utils.instantiate(model_cfg)
    module.config_yaml = ckpt["ldmlab_config"]
    module.on_load_checkpoint(ckpt)  # the latent shape, the text encoder's weights
    module.load_state_dict(ckpt["state_dict"])
    ema = ckpt.get("callbacks", {}).get("EMA")
    if use_ema and ema is not None:  # the shadow holds the trainable tensors: all, or a LoRA run's adapters
        module.unet.load_state_dict({**module.unet.state_dict(), **ema["shadow"]})
    return module.eval()


def _sampler(module: LatentDiffusionModule, name: str | None, steps: int | None) -> Any:
    """The sampler conf/model/diffusion/sampler/<name>.yaml (None = the model's own), with num_steps overridden if
    given."""
    if name is None:
        base = module.diffusion.sampler
    else:
        path = CONF / "model" / "diffusion" / "sampler" / f"{name}.yaml"
        if not path.exists():
            valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
            raise ValueError(f"sampler={name!r} unknown; valid: {valid}")
        base = hydra.utils.instantiate(OmegaConf.load(path))
    return partial(base, num_steps=steps) if steps is not None else base


def _cond_values(module: LatentDiffusionModule, cfg: DictConfig) -> list[Any] | None:
    conditioner = module.conditioner
    if conditioner is None:
        return None
    if isinstance(conditioner, ClassConditioner):
        if cfg.label is not None and not 0 <= int(cfg.label) < conditioner.num_classes:
            raise ValueError(f"label={cfg.label} outside [0, {conditioner.num_classes}): pick a trained class")
        return [int(cfg.label) if cfg.label is not None else i % conditioner.num_classes for i in range(cfg.n)]
    if cfg.prompt is None:
        raise ValueError("this model is text-conditional: give prompt=\"...\"")
    return [str(cfg.prompt)] * cfg.n


def latent_shape(module: LatentDiffusionModule, height: int | None, width: int | None) -> tuple[int, int, int] | None:
    """(C, h, w) of latents decoding to height × width (either null: the training size's); None: training shape.

    The networks are convolutional, so any multiple of the total downsampling works (validate_sample checks it).
    """
    if height is None and width is None:
        return None
    f = module.vae.downsample_factor
    if height is None or width is None:
        try:
            trained = module.latent_shape
        except ValueError:
            raise ValueError("this checkpoint stores no training size: give both height= and width=") from None
        height, width = height or trained[-2] * f, width or trained[-1] * f
    return module.vae.embed_dim, height // f, width // f  # not in_channels: an image condition adds inputs


def condition_images(module: LatentDiffusionModule, cfg: DictConfig) -> tuple[dict[str, torch.Tensor] | None, Any]:
    """An image-conditioned model's inputs from image= (and mask=, white = inpaint), one row each on the module's
    device, and the latent shape they fix (low-res × factor, or the image's size); (None, None) for other models."""
    condition = module.image_condition
    if condition is None:
        return None, None
    image = to_tensor(Image.open(cfg.image))[None].to(module.device)  # (1, 3, h, w) in [-1, 1]
    if isinstance(condition, SuperResolution):
        if cfg.get("noise_level") is not None:
            condition.noise_level = int(cfg.noise_level)
        images, scale = {"low_res": image}, condition.factor
    else:
        mask = np.asarray(Image.open(cfg.mask).convert("L")) > 127
        images, scale = {"image": image, "mask": torch.from_numpy(mask).float()[None, None].to(module.device)}, 1
    h, w = image.shape[-2] * scale, image.shape[-1] * scale
    return images, latent_shape(module, h, w)


def prepare_for_sampling(module: LatentDiffusionModule, bf16: bool = True, compile: str = "auto") -> Any:
    """On a GPU, what trainer=gpu trains with: TF32, cuDNN attention first (1.5-1.7x flash at SD's head width 40,
    docs/BENCHMARKS.md), channels_last, bf16 autocast unless `bf16=false` with the conv and linear weights cast
    to bf16 once (bit-identical to autocast's per-call casts), and the U-Net and VAE compiled (`compile`: none |
    regional | full | auto = full on a GPU, none on the CPU). Returns the autocast context to sample in."""
    scope = ("full" if module.device.type == "cuda" else "none") if compile == "auto" else compile
    models = [m for m in (module.unet, module.vae) if m is not None]
    for model in models:
        accel.compile_model(model, scope)  # lazy: the VAE's encoder, never called here, is never traced
    if module.device.type != "cuda":
        return contextlib.nullcontext()
    accel.enable_tensor_cores()
    accel.set_sdpa_order(["cudnn", "flash"])
    accel.to_channels_last(module)
    for model in models:
        if bf16:
            accel.cast_matmul_weights(model)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(bf16))


def add_fine_tunes(module: LatentDiffusionModule, cfg: DictConfig) -> None:
    """`lora=` (ldmlab, PEFT/diffusers or kohya file: U-Net and text-encoder adapters), `lora_scale=`, and
    `embedding=` (a Textual Inversion learned-embeds file, its token renamed by `embedding_token=`)."""
    text = module.conditioner if isinstance(module.conditioner, TextConditioner) else None
    if cfg.get("embedding"):
        if text is None:
            raise ValueError(f"embedding={cfg.embedding} needs a text-conditioned checkpoint; {cfg.ckpt} is not one")
        tokens = load_learned_embeds(cfg.embedding, text.tokenizer, text.encoder, cfg.get("embedding_token"))
        print(f"embedding: added {' '.join(tokens)}")
    if cfg.get("lora"):
        load_lora_file(cfg.lora, module.unet)
        if text is not None and lora_components(cfg.lora) >= {"text_encoder"}:
            load_lora_file(cfg.lora, text.encoder, component="text_encoder")
    if cfg.get("lora_scale") is not None:
        for model in (module.unet, text.encoder if text is not None else None):
            if model is not None:
                set_lora_scale(model, float(cfg.lora_scale))


def classifier_guide(module: LatentDiffusionModule, cfg: DictConfig) -> Callable[[int, int], Any] | None:
    """`classifier=` `classifier_scale=`: (start, n) ↦ the wrapper of the (CFG) denoiser that guides images start…
    start+n towards their class (ADM eq. 14): label=, else classes 0…K−1 cycled as a class LDM's labels are."""
    if not cfg.get("classifier"):
        return None
    classifier = load_classifier(cfg.classifier).to(module.device)
    k = classifier.num_classes
    labels = torch.tensor([int(cfg.label) if cfg.label is not None else i % k for i in range(cfg.n)])

    def guide(start: int, n: int) -> Any:
        grad = classifier_gradient(classifier, labels[start:start + n].to(module.device))
        return partial(classifier_guidance, grad_log_p=grad, scale=float(cfg.classifier_scale),
                       schedule=module.diffusion.noise_schedule, prediction=module.diffusion.prediction)

    return guide


def sample(cfg: DictConfig) -> Path:
    """Generate cfg.n images in batches and write the grid (and single PNGs if asked); returns the grid path."""
    validate_sample(cfg)  # one line per problem (unsafe ckpt, guidance without p_uncond, ...) before loading
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = load_ldm(cfg.ckpt, cfg.ema).to(device)
    add_fine_tunes(module, cfg)
    if module.vae is None:
        raise ValueError("this checkpoint has no VAE to decode latents into images")
    sampler, values = _sampler(module, cfg.sampler, cfg.steps), _cond_values(module, cfg)
    inputs, shape = condition_images(module, cfg)
    shape = shape or latent_shape(module, cfg.get("height"), cfg.get("width"))
    autocast = prepare_for_sampling(module, cfg.bf16, cfg.compile)
    guide = classifier_guide(module, cfg)  # samplers run under no_grad; its gradient turns autograd back on
    samples = []
    for start in range(0, cfg.n, cfg.batch_size):
        n = min(cfg.batch_size, cfg.n - start)
        chunk = values[start:start + n] if values is not None else None
        rows = None if inputs is None else {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}
        with autocast:
            samples.append(module.sample(chunk, n, cfg.guidance, seed=cfg.seed + start, latent_shape=shape,
                                         sampler=sampler, guide=guide(start, n) if guide else None,
                                         images=rows).float().cpu())
    images = torch.cat(samples)
    tag = f"_c{cfg.classifier_scale:g}" if cfg.get("classifier") else ""  # classifier guidance's γ
    out = Path(cfg.out) if cfg.out else (Path(cfg.ckpt).resolve().parents[1] / "samples" /
                                         f"{cfg.sampler or 'default'}_g{cfg.guidance:g}{tag}_s{cfg.seed}.png")
    save_png(make_grid(images, nrow=cfg.nrow), out)
    if cfg.individual:
        for i, img in enumerate(images):
            save_png(make_grid(img[None], nrow=1, padding=0), out.with_name(f"{out.stem}_{i:04d}.png"))
    print(f"wrote {len(images)} samples to {out}")
    return out

