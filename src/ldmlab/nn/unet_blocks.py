"""Convolutional blocks of the latent-diffusion U-Net, named as in SD-original / CompVis LDM
(`ldm/modules/diffusionmodules/openaimodel.py`: `ResBlock`, `Downsample`, `Upsample`,
`TimestepEmbedSequential`).

`ResBlock` keeps LDM's `nn.Sequential` layout (`in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`,
`skip_connection`) and `Downsample.op` / `Upsample.conv` so SD `model.diffusion_model.*` weights load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldmlab.nn.attention import SpatialTransformer, zero_module

RESBLOCK_NORM_EPS = 1e-5  # LDM `normalization()` = GroupNorm32(32, C) with torch's default eps


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm of the U-Net's res blocks and output head (eps 1e-5, affine)."""
    return nn.GroupNorm(groups, channels, eps=RESBLOCK_NORM_EPS, affine=True)


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) + time embedding, (GroupNorm, SiLU, dropout, 3x3 conv) + skip."""

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),  # LDM: block starts as identity
        )
        # LDM use_conv=False: 1x1 projection on a channel change, else an Identity (no parameters)
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out, 1, 1) broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class Downsample(nn.Module):
    """3x3 stride-2 conv with padding 1 (LDM `Downsample(use_conv=True)`, name `op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then 3x3 conv (LDM `Upsample(use_conv=True)`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """(B, C, H, W) -> (B, C, *size), default (2H, 2W)."""
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """One `input_blocks.i` / `middle_block` / `output_blocks.i` entry: layers indexed 0, 1, 2 as in LDM's
    `TimestepEmbedSequential`, each given the inputs it takes (time embedding, context, target size)."""

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Apply the layers in order: (B, C, H, W) -> (B, C', H', W')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x
