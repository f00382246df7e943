"""Transformer blocks of the latent-diffusion U-Net, named as in SD-original / CompVis LDM
(`ldm/modules/attention.py`: `SpatialTransformer`, `BasicTransformerBlock`, `CrossAttention`, `FeedForward`).

Parameter names (`proj_in`, `transformer_blocks.k.attn1.to_q`, `ff.net.0.proj`, `norm3`, ...) match that
file so SD `model.diffusion_model.*` weights load after stripping the prefix; diffusers' `Transformer2DModel`
uses the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

TRANSFORMER_NORM_EPS = 1e-6  # LDM `Normalize` in SpatialTransformer: GroupNorm(32, C, eps=1e-6)
FF_MULT = 4  # LDM FeedForward(mult=4)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter (LDM `zero_module`): residual branches start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values from `context` (cross) or from x itself (self) if context is None."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner, kv_dim = num_heads * head_dim, context_dim or dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, heads*d) -> (B, heads, L, d)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def _project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, heads, L or S, d)."""
        kv = x if context is None else context
        return self._heads(self.to_q(x)), self._heads(self.to_k(kv)), self._heads(self.to_v(kv))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x (B, L, dim), context (B, S, context_dim) or None -> (B, L, dim)."""
        q, k, v = self._project(x, context)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d), scale 1/sqrt(d)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2*inner, value * GELU(gate)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, dim) -> (B, L, inner)."""
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with hidden width 4*dim; `net.0.proj`, `net.2` as in LDM."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * FF_MULT
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention (only if context_dim is set), GEGLU feed-forward."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        # registration order = LDM's, so state-dict keys come out in SD-original order
        self.attn1 = CrossAttention(dim, num_heads, head_dim, None, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, num_heads, head_dim, context_dim, dropout) if context_dim else None
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and self.norm2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual (LDM).

    `use_linear_projection=False` uses 1x1 convs around the token reshape (SD1.x); True uses Linear layers
    after / before it (SD2.x).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        depth: int,
        context_dim: int | None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_linear_projection: bool = False,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        self.use_linear = use_linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=TRANSFORMER_NORM_EPS, affine=True)
        self.proj_in = nn.Linear(channels, inner) if self.use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, num_heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        proj_out = nn.Linear(inner, channels) if self.use_linear else nn.Conv2d(inner, channels, 1)
        self.proj_out = zero_module(proj_out)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)  # (B, inner, H, W)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C)
        if self.use_linear:
            y = self.proj_in(y)  # (B, HW, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)  # (B, HW, C)
        # (B, C or inner, H, W) as a view: channels_last strides already, so a channels_last model copies
        # nothing; an NCHW model gets its usual contiguous layout back (one copy, as before)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """(B, C, H, W), context (B, S, context_dim) or None -> (B, C, H, W)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # recompute in backward: attention maps are the largest activations of the U-Net
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)
