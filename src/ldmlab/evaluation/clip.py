"""CLIP image and text towers (Radford et al. 2021) from a local transformers directory, CLIP preprocessing in torch.

Images are features for FID/KID/precision-recall in CLIP space (Kynkäänniemi et al. 2023 use the projected image
embedding, as torch-fidelity's and clean-fid's CLIP extractors do); image and text embeddings, normalised, give
the CLIP score (Hessel et al. 2021). transformers is imported only when a directory is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# OpenAI CLIP's normalisation (clip/clip.py `_transform`; transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SOURCE = ('make it on a machine with internet: CLIPModel.from_pretrained("openai/clip-vit-large-patch14")'
               '.save_pretrained(DIR), and CLIPProcessor.from_pretrained(the same).save_pretrained(DIR) for the '
               'tokenizer and preprocessing')
# ViT widths of the released CLIP models → their size letter (B/32, B/16, L/14, H/14, g/14, bigG/14)
_VIT_SIZES = {768: "b", 1024: "l", 1280: "h", 1408: "g", 1664: "bigg"}


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image transform: bicubic resize of the shortest side, center crop, rescale to [0, 1], mean/std."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_dir(cls, directory: Path, image_size: int) -> ClipPreprocess:
        """Settings of the directory's preprocessor_config.json, else OpenAI's at the model's image_size."""
        file = directory / "preprocessor_config.json"
        if not file.exists():
            return cls(image_size, (image_size, image_size))
        cfg = json.loads(file.read_text())
        if cfg.get("resample", 3) != 3 or not cfg.get("do_center_crop", True):
            raise ValueError(f"{file}: expected CLIP's bicubic resize (resample=3) and center crop")
        size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
        size = size["shortest_edge"] if isinstance(size, dict) else size  # older files store plain ints
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), (int(crop[0]), int(crop[1])), tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(cfg.get("image_std", OPENAI_CLIP_STD)))

    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, 3, crop_h, crop_w) normalised pixel values, float32.

        Sizes and crop offsets follow transformers' CLIPImageProcessor (long side int(s·long/short), crop offset
        (size - crop) // 2). Torch's antialiased bicubic is PIL's bicubic filter (a = -0.5); PIL resizes width
        then height and clips to [0, 255] after each pass, and so does this, without PIL's rounding to uint8.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}: expected (B, 3, H, W) in [-1, 1]")
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        s = self.shortest_edge
        size = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
        for step in ((h, size[1]), size):  # the horizontal pass, then the vertical one
            if step != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=step, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.crop[0]) // 2, (size[1] - self.crop[1]) // 2
        x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        mean, std = x.new_tensor(self.mean)[:, None, None], x.new_tensor(self.std)[:, None, None]
        return (x - mean) / std


def clip_name(vision_config: Any, directory: Path) -> str:
    """`clip-vit-l14:<dirname>` (`-336px` appended for other input sizes than 224) from the vision config."""
    width, patch, size = vision_config.hidden_size, vision_config.patch_size, vision_config.image_size
    arch = f"vit-{_VIT_SIZES.get(width, f'w{width}-')}{patch}" + ("" if size == 224 else f"-{size}px")
    return f"clip-{arch}:{directory.resolve().name}"


class ClipTowers(nn.Module):
    """A frozen transformers CLIPModel: forward = image embeddings (features), plus normalised image/text embeds."""

    has_logits = False
    model: Any  # transformers.CLIPModel (imported lazily)

    def __init__(self, model: Any, preprocess: ClipPreprocess, tokenizer: Any | None, name: str) -> None:
        super().__init__()
        self.model, self.preprocess, self.tokenizer, self.name = model, preprocess, tokenizer, name
        self.num_features = int(model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, directory: Path) -> ClipTowers:
        """Load model, tokenizer (if saved there) and preprocessing settings from a save_pretrained directory."""
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as error:
            raise ImportError(f"features.name=clip needs transformers ({error}): pip install transformers") from None
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"features.path={directory} has no config.json: features.name=clip expects a "
                                    f"transformers CLIPModel directory; {CLIP_SOURCE}")
        model = CLIPModel.from_pretrained(str(directory)).float()
        has_tokenizer = (directory / "vocab.json").exists() or (directory / "tokenizer.json").exists()
        tokenizer = CLIPTokenizer.from_pretrained(str(directory)) if has_tokenizer else None
        vision = model.config.vision_config
        return cls(model, ClipPreprocess.from_dir(directory, vision.image_size), tokenizer, clip_name(vision, directory))

    def train(self, mode: bool = True) -> ClipTowers:
        """Always eval (a feature network is frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, projection_dim) float32 projected image embeddings (not normalised)."""
        x = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output  # (B, vision width): post-LN class token
        return self.model.visual_projection(pooled).float()

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → (B, D) unit-norm image embeddings."""
        return F.normalize(self(images), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> Tensor:
        """B captions → (B, D) unit-norm text embeddings (truncated to the text tower's context length)."""
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.name}: no tokenizer in the CLIP directory (vocab.json/tokenizer.json), "
                                    f"needed for text embeddings; {CLIP_SOURCE}")
        device = self.model.text_projection.weight.device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output  # end-of-text token
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def logits(self, images: Tensor) -> Tensor:
        """CLIP has no class logits."""
        from ldmlab.evaluation.features import no_logits

        raise no_logits(self.name)
