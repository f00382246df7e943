"""How a LatentDiffusionModule fine-tunes its U-Net (`model.finetune`, conf/finetune/): None = every weight
trains (`finetune=full`); `LoRA` wraps the base in adapters (ldmlab.finetune.lora) and exports only those."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from ldmlab.finetune.lora import PRESETS, add_lora, lora_state_dict
from ldmlab.finetune.lora_formats import save_lora_diffusers, save_lora_kohya


class FineTune(Protocol):
    """What LatentDiffusionModule asks of `model.finetune`."""

    def apply(self, unet: nn.Module) -> None:
        """Change `unet` in place after its initial weights are loaded (freeze, wrap)."""

    def export(self, dirpath: Path, unet: nn.Module, ema: dict[str, Tensor] | None) -> list[Path]:
        """Write what this fine-tune produced (`ema`: the EMA shadow of the U-Net's trainable tensors)."""


class LoRA:
    """LoRA on the U-Net: `targets` a preset (attention | feed_forward | conv) or a list of name regexes."""

    def __init__(self, rank: int = 16, alpha: float = 16.0, dropout: float = 0.0,
                 targets: str | Sequence[str] = "attention") -> None:
        if isinstance(targets, str):
            if targets not in PRESETS:
                raise ValueError(f"model.finetune.targets={targets!r} unknown; presets: {', '.join(PRESETS)} "
                                 "(or a list of module-name regexes)")
            targets = PRESETS[targets]
        self.rank, self.alpha, self.dropout, self.targets = rank, float(alpha), dropout, tuple(map(str, targets))

    def apply(self, unet: nn.Module) -> None:
        add_lora(unet, self.rank, self.alpha, self.dropout, self.targets)

    @torch.no_grad()
    def export(self, dirpath: Path, unet: nn.Module, ema: dict[str, Tensor] | None) -> list[Path]:
        """`unet_lora.safetensors` (PEFT/diffusers) and `unet_lora_kohya.safetensors`, EMA adapters when given."""
        params = dict(unet.named_parameters())
        trained = {k: v.detach().clone() for k, v in lora_state_dict(unet).items() if k in params}
        if ema:
            for k in trained:
                params[k].copy_(ema[k])
        try:
            paths = [Path(dirpath) / "unet_lora.safetensors", Path(dirpath) / "unet_lora_kohya.safetensors"]
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            save_lora_diffusers(paths[0], unet)
            save_lora_kohya(paths[1], unet)
        finally:
            for k, v in trained.items():
                params[k].copy_(v)
        return paths
