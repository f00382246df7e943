"""Timestep embeddings of the latent-diffusion U-Net (LDM `openaimodel.timestep_embedding`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), [cos | sin] (LDM; diffusers flip_sin_to_cos, freq_shift=0)."""
    half = dim // 2
    # frequencies max_period^(-k/half), k = 0..half-1 (Vaswani et al. 2017, sec. 3.5); same op order as
    # diffusers' `get_timestep_embedding`, so the float32 values agree bit for bit
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb
