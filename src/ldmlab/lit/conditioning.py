"""Conditioners: turn a batch into the U-Net's conditioning kwargs, with a null value for guidance.

Each returns a dict of U-Net keyword arguments (`class_labels=` or `context=`), so the module and the
samplers never branch on the conditioning type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmlab.diffusion.conditioning import drop_condition
from ldmlab.finetune.textual_inversion import expand_prompt


class ClassConditioner(nn.Module):
    """Integer labels → `class_labels`; index `num_classes` is the null (unconditional) class."""

    key = "class_labels"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"conditioner.num_classes={num_classes} must be >= 1")
        self.num_classes = num_classes

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["label"]
        if bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
            raise ValueError(f"batch labels {labels.tolist()} outside [0, {self.num_classes}): "
                             "set model.conditioner.num_classes to the dataset's class count")
        return {self.key: labels.long()}

    def from_values(self, labels: list[int], device: torch.device) -> dict[str, Tensor]:
        """Conditioning for explicit labels (sampling)."""
        return self.forward({"label": torch.as_tensor(labels, device=device)})

    def grid_values(self, batch: dict[str, Any], n: int) -> list[int]:
        """Labels 0…K−1 cycled, for a sample grid."""
        return [i % self.num_classes for i in range(n)]

    def unconditional(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        return {self.key: torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)}

    def drop(self, cond: dict[str, Tensor], p_uncond: float, generator: torch.Generator | None) -> dict[str, Tensor]:
        null = torch.tensor(self.num_classes)
        return {self.key: drop_condition(cond[self.key], null, p_uncond, generator)}


class TextConditioner(nn.Module):
    """Prompts → frozen CLIP text-encoder hidden states `context` (B, 77, D); "" is the null prompt (SD).

    The encoder is loaded from a local `transformers` directory (no hub access); a batch may instead carry
    precomputed embeddings under "context".
    """

    key = "context"

    def __init__(self, path: str | Path, max_length: int = 77) -> None:
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only when text conditioning is used

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"text encoder '{path}' not found: set model.conditioner.path to a local "
                                    "directory holding a CLIPTextModel and its tokenizer (save_pretrained)")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(path))
        self.encoder = CLIPTextModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.max_length = max_length

    def train(self, mode: bool = True) -> TextConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout off even while the U-Net trains
        return self

    @property
    def trainable(self) -> bool:
        """Whether a fine-tune trains part of the encoder (Textual Inversion rows, text-encoder LoRA)."""
        return any(p.requires_grad for p in self.encoder.parameters())

    def encode(self, prompts: list[str], device: torch.device) -> Tensor:
        # multi-vector Textual Inversion tokens are spelled out first, as diffusers' pipelines do
        prompts = [expand_prompt(p, self.tokenizer) for p in prompts]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            return self.encoder(tokens).last_hidden_state  # (B, 77, D)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        if "context" in batch:
            return {self.key: batch["context"]}
        device = next(self.encoder.parameters()).device
        return {self.key: self.encode(list(batch["text"]), device)}

    def from_values(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        return {self.key: self.encode(prompts, device)}

    def grid_values(self, batch: dict[str, Any], n: int) -> list[str]:
        """The batch's first n prompts (cycled when the batch holds fewer), for a sample grid."""
        prompts = list(batch["text"])
        return [prompts[i % len(prompts)] for i in range(n)]

    def unconditional(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        if self.trainable:  # a trained encoder (text-encoder LoRA) moves the empty prompt's embedding too
            return {self.key: self.encode([""], device).expand(batch_size, -1, -1)}
        # a frozen encoder's empty-prompt embedding is fixed: encode it once per device, not every step
        if getattr(self, "_null", None) is None or self._null.device != torch.device(device):
            with torch.no_grad():
                self._null = self.encode([""], device)
        return {self.key: self._null.expand(batch_size, -1, -1)}

    def drop(self, cond: dict[str, Tensor], p_uncond: float, generator: torch.Generator | None) -> dict[str, Tensor]:
        null = self.unconditional(1, cond[self.key].device)[self.key][0]  # (77, D) empty-prompt embedding
        return {self.key: drop_condition(cond[self.key], null, p_uncond, generator)}
