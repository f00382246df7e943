"""How a LatentDiffusionModule fine-tunes (`model.finetune`, conf/finetune/): None = every U-Net weight trains
(`finetune=full`); `LoRA` wraps the U-Net (and, when asked, the text encoder) in adapters and exports only those
(ldmlab.finetune.lora); `TextualInversion` trains the embedding rows of new tokens alone
(ldmlab.finetune.textual_inversion). What a fine-tune leaves trainable (`requires_grad`) is what the optimizer,
the EMA and the checkpoint's conditioner part hold."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ldmlab.finetune.dreambooth import class_images_ready, write_class_images
from ldmlab.finetune.lora import PRESETS, TEXT_ENCODER, add_lora, lora_modules, lora_state_dict
from ldmlab.finetune.lora_formats import save_lora_diffusers, save_lora_kohya
from ldmlab.finetune.textual_inversion import add_concept, init_vector, save_learned_embeds
from ldmlab.lit.conditioning import TextConditioner


class FineTune(Protocol):
    """What LatentDiffusionModule asks of `model.finetune`."""

    prior_weight: float  # λ of a prior-preservation loss on batches with a "prior" part (DreamBooth); else 0

    def apply(self, unet: nn.Module, conditioner: nn.Module | None) -> None:
        """Change `unet` / `conditioner` in place after the initial weights are loaded (freeze, wrap, add)."""

    def prepare(self, module: nn.Module) -> None:
        """Data the fine-tune makes with the base model before training (Lightning's prepare_data)."""

    def export(self, dirpath: Path, unet: nn.Module, conditioner: nn.Module | None,
               ema: dict[str, Tensor] | None) -> list[Path] | None:
        """Write what this fine-tune produced (`ema`: the EMA shadow of the U-Net's trainable tensors);
        None: the module's own export (the whole U-Net)."""


def _text_conditioner(conditioner: nn.Module | None, what: str) -> TextConditioner:
    if not isinstance(conditioner, TextConditioner):
        raise ValueError(  # noqa: TRY004 — a setting, not a type: the entry points print ValueErrors as one line
            f"{what} needs a text-conditioned model (model.conditioner: TextConditioner), not "
            f"{type(conditioner).__name__}")
    return conditioner


class LoRA:
    """LoRA on the U-Net: `targets` a preset (attention | feed_forward | conv) or a list of name regexes;
    `text_encoder=true` also adapts the CLIP text encoder's attention with the same rank and alpha."""

    prior_weight = 0.0

    def __init__(self, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
                 targets: str | Sequence[str] = "attention", text_encoder: bool = False) -> None:
        if isinstance(targets, str):
            if targets not in PRESETS:
                raise ValueError(f"model.finetune.targets={targets!r} unknown; presets: {', '.join(PRESETS)} "
                                 "(or a list of module-name regexes)")
            targets = PRESETS[targets]
        self.rank, self.alpha, self.dropout, self.targets = rank, float(alpha), dropout, tuple(map(str, targets))
        self.text_encoder = text_encoder

    def prepare(self, module: nn.Module) -> None:
        pass

    def apply(self, unet: nn.Module, conditioner: nn.Module | None) -> None:
        add_lora(unet, self.rank, self.alpha, self.dropout, self.targets)
        if self.text_encoder:
            encoder = _text_conditioner(conditioner, "model.finetune.text_encoder=true").encoder
            add_lora(encoder, self.rank, self.alpha, self.dropout, TEXT_ENCODER)

    @torch.no_grad()
    def export(self, dirpath: Path, unet: nn.Module, conditioner: nn.Module | None,
               ema: dict[str, Tensor] | None) -> list[Path]:
        """`unet_lora.safetensors` (PEFT/diffusers) and `unet_lora_kohya.safetensors`, EMA adapters when given;
        a text-encoder LoRA goes into the same files (diffusers and kohya keep both in one)."""
        params = dict(unet.named_parameters())
        trained = {k: v.detach().clone() for k, v in lora_state_dict(unet).items() if k in params}
        encoder = getattr(conditioner, "encoder", None)
        encoder = encoder if encoder is not None and any(True for _ in lora_modules(encoder)) else None
        if ema:
            for k in trained:
                params[k].copy_(ema[k])
        try:
            paths = [Path(dirpath) / "unet_lora.safetensors", Path(dirpath) / "unet_lora_kohya.safetensors"]
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            save_lora_diffusers(paths[0], unet, encoder)
            save_lora_kohya(paths[1], unet, encoder)
        finally:
            for k, v in trained.items():
                params[k].copy_(v)
        return paths


class TextualInversion:
    """A new token `token` (n = `num_vectors` embeddings, initialised from `init_word`) on a frozen model."""

    prior_weight = 0.0

    def __init__(self, token: str = "<concept>", init_word: str = "object", num_vectors: int = 1) -> None:
        if num_vectors < 1:
            raise ValueError(f"model.finetune.num_vectors={num_vectors} must be >= 1")
        self.token, self.init_word, self.num_vectors = token, init_word, num_vectors

    def prepare(self, module: nn.Module) -> None:
        pass

    def apply(self, unet: nn.Module, conditioner: nn.Module | None) -> None:
        text = _text_conditioner(conditioner, "finetune=textual_inversion")
        unet.requires_grad_(False)
        init = init_vector(text.tokenizer, text.encoder, self.init_word)
        add_concept(text.tokenizer, text.encoder, self.token, init.expand(self.num_vectors, -1).clone())

    def export(self, dirpath: Path, unet: nn.Module, conditioner: nn.Module | None,
               ema: dict[str, Tensor] | None) -> list[Path]:
        """`learned_embeds.safetensors` ({token: (n, D)}, for `pipe.load_textual_inversion`)."""
        text = _text_conditioner(conditioner, "finetune=textual_inversion")
        return [save_learned_embeds(Path(dirpath) / "learned_embeds.safetensors", text.tokenizer, text.encoder,
                                    self.token)]


class DreamBooth:
    """DreamBooth (Ruiz et al. 2023): the whole U-Net, or LoRA adapters when `lora` gives their settings, trained on
    "a [identifier] [class noun]" instance images plus `prior_weight` × the loss on `num_class_images` images the
    base model draws from "a [class noun]" before training (cached in `class_dir`; data=dreambooth streams both)."""

    def __init__(self, identifier: str, class_noun: str, class_dir: str, prior_weight: float = 1.0,
                 num_class_images: int = 200, image_size: int = 512, guidance: float = 5.0,
                 lora: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 4) -> None:
        if prior_weight < 0:
            raise ValueError(f"model.finetune.prior_weight={prior_weight} must be >= 0 (0: no prior preservation)")
        if prior_weight > 0 and num_class_images < 1:
            raise ValueError(f"model.finetune.prior_weight={prior_weight} needs class images: set "
                             "model.finetune.num_class_images>0 (the paper draws 200), or prior_weight=0")
        self.identifier, self.class_noun, self.class_dir = identifier, class_noun, class_dir
        self.prior_weight, self.num_class_images, self.image_size = float(prior_weight), num_class_images, image_size
        self.guidance, self.seed, self.batch_size = guidance, seed, batch_size
        self.lora = LoRA(**lora) if lora else None

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun}"

    def apply(self, unet: nn.Module, conditioner: nn.Module | None) -> None:
        _text_conditioner(conditioner, "finetune=dreambooth")
        if self.lora is not None:
            self.lora.apply(unet, conditioner)

    @torch.no_grad()
    def prepare(self, module: nn.Module) -> None:
        """Draw the class images with the base weights (before a resumed checkpoint is loaded), once."""
        if self.prior_weight == 0 or class_images_ready(self.class_dir, self.class_prompt, self.num_class_images):
            return
        if float(module.latent_scale) == 0.0:
            raise ValueError("finetune=dreambooth draws its class images before training, but the latent scale is "
                             "not known yet: set model.latent_scale, or start from a model.training.unet_init that "
                             "stores it")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        side = self.image_size // module.vae.downsample_factor
        shape = (module.vae.embed_dim, side, side)
        was = module.device
        module.to(device)
        try:
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                write_class_images(self.class_dir, self.class_prompt, self.num_class_images,
                                   partial(self._draw, module, shape), self.batch_size)
        finally:
            module.to(was)

    def _draw(self, module: nn.Module, shape: tuple[int, int, int], start: int, n: int) -> Tensor:
        """Class images start..start+n, each batch seeded by its first index (a resumed draw repeats them)."""
        return module.sample([self.class_prompt] * n, n, self.guidance, seed=self.seed + start,
                             latent_shape=shape).float()

    def export(self, dirpath: Path, unet: nn.Module, conditioner: nn.Module | None,
               ema: dict[str, Tensor] | None) -> list[Path] | None:
        return self.lora.export(dirpath, unet, conditioner, ema) if self.lora is not None else None
