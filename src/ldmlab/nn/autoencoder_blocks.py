"""Building blocks of the KL autoencoder, named as in SD-original / CompVis LDM
(`ldm/modules/diffusionmodules/model.py`).

Parameter names (`norm1`, `conv1`, `nin_shortcut`, `q/k/v/proj_out`, ...) match that file exactly so an SD
`first_stage_model.*` state dict loads after stripping the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

GROUPNORM_EPS = 1e-6  # SD/LDM `Normalize`: GroupNorm(32, C, eps=1e-6, affine=True)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as in SD's `Normalize` (eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=GROUPNORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) x 2; 1x1 `nin_shortcut` on channel change."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # SD's VAE uses conv_shortcut=False, i.e. a 1x1 "network-in-network" projection.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: trades ~30 % more compute for far less activation memory.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out, as in SD's VAE mid block."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W); attention over the H*W positions, scale 1/sqrt(C)."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head of width C (a view when the model is channels_last)
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        y = y.reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels_last strides: the 1x1 conv takes it as is
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve H and W: asymmetric zero pad (0, 1, 0, 1) then 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2) for even H, W."""
        # SD/taming: pad right and bottom only, so even H maps exactly to H/2 (Conv2d pads symmetrically).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
