"""Convolutional blocks of the latent-diffusion U-Net, named as in SD-original / CompVis LDM
(`ldm/modules/diffusionmodules/openaimodel.py`: `ResBlock`, `Downsample`, `Upsample`,
`TimestepEmbedSequential`).

`ResBlock` keeps LDM's `nn.Sequential` layout (`in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`,
`skip_connection`) and `Downsample.op` / `Upsample.conv` so SD `model.diffusion_model.*` weights load.
ADM's options (Dhariwal & Nichol 2021, sec. 3), which openaimodel also has: adaptive group normalisation
(`use_scale_shift_norm`) and BigGAN residual up/downsampling (`ResBlock(up=True | down=True)`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldmlab.nn.attention import SpatialTransformer, zero_module

RESBLOCK_NORM_EPS = 1e-5  # LDM `normalization()` = GroupNorm32(32, C) with torch's default eps


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm of the U-Net's res blocks and output head (eps 1e-5, affine)."""
    return nn.GroupNorm(groups, channels, eps=RESBLOCK_NORM_EPS, affine=True)


Resample = Literal["up", "down"] | None


def resample_layer(resample: Resample) -> nn.Module | None:
    """The parameter-free resampling of a BigGAN residual block: 2x nearest up, or 2x2 average pooling down
    (ADM `Upsample` / `Downsample` with use_conv=False; diffusers `Upsample2D` / `Downsample2D` likewise)."""
    if resample == "up":
        return nn.Upsample(scale_factor=2.0, mode="nearest")
    if resample == "down":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if resample is not None:
        raise ValueError(f"resample={resample!r} is unknown: use 'up', 'down' or None")
    return None


class ResBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) + time embedding, (GroupNorm, SiLU, dropout, 3x3 conv) + skip.

    `scale_shift`: ADM's adaptive group normalisation, GroupNorm(h)·(1 + y_s) + y_b with (y_s, y_b) the time
    embedding projected to 2·C_out (Dhariwal & Nichol 2021, sec. 3), instead of adding it before the norm.
    `resample`: BigGAN-style up/downsampling inside the block (ADM sec. 3; Brock et al. 2019), applied to both
    branches after the first norm and activation, before the first conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        norm_groups: int = 32,
        scale_shift: bool = False,
        resample: Resample = None,
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            group_norm(channels, norm_groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.scale_shift = scale_shift
        self.resample = resample_layer(resample)
        emb_out = 2 * out_channels if scale_shift else out_channels  # (y_s, y_b) or one additive shift
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
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
        if self.resample is None:
            h = self.in_layers(x)
        else:  # ADM ResBlock.forward: norm, act, resample, conv; the skip branch is resampled too
            h = self.in_layers[2](self.resample(self.in_layers[1](self.in_layers[0](x))))
            x = self.resample(x)
        e = self.emb_layers(emb)[:, :, None, None]  # (B, C_out or 2·C_out, 1, 1) broadcast over H, W
        if not self.scale_shift:
            return self.skip_connection(x) + self.out_layers(h + e)
        scale, shift = e.chunk(2, dim=1)  # ADM: out_norm(h) * (1 + scale) + shift, then act, dropout, conv
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)

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
