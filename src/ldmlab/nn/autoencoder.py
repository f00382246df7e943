"""SD-compatible KL autoencoder (LDM `AutoencoderKL`, SD's first stage), as plain `nn.Module`s.

State-dict names follow SD-original / CompVis LDM (`encoder.down.0.block.0.norm1.weight`,
`encoder.mid.attn_1.q.weight`, `quant_conv.weight`, ...): an SD checkpoint's `first_stage_model.*` entries
load after stripping that prefix.
Defaults are SD's kl-f8 (LDM `autoencoder_kl_32x32x4`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmlab.nn.autoencoder_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from ldmlab.nn.checks import check_dropout, check_groups, check_levels, check_positive

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM `DiagonalGaussianDistribution` clamp: keeps exp(logvar) finite


class MidBlock(nn.Module):
    """ResnetBlock, optional single-head attention, ResnetBlock (LDM `mid.block_1 / attn_1 / block_2`)."""

    def __init__(self, channels: int, dropout: float, norm_groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups) if attention else None
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Level(nn.Module):
    """One resolution level: res blocks (`block.j`), attention after each (`attn.j`, optional), resampler."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        n_blocks: int,
        attention: bool,
        dropout: float,
        norm_groups: int,
        resample: Literal["down", "up"] | None = None,
    ) -> None:
        super().__init__()
        chans = [channels_in] + [channels_out] * n_blocks
        self.block = nn.ModuleList(
            ResnetBlock(a, b, dropout, norm_groups) for a, b in itertools.pairwise(chans)
        )
        self.attn = nn.ModuleList(
            AttnBlock(channels_out, norm_groups) for _ in range(n_blocks if attention else 0)
        )
        # None-valued attributes register no parameters, so the names match LDM's exactly.
        self.downsample = Downsample(channels_out) if resample == "down" else None
        self.upsample = Upsample(channels_out) if resample == "up" else None

    def forward(self, h: Tensor) -> Tensor:
        """Res blocks (each followed by attention if enabled), then the resampler if any."""
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        if self.downsample is not None:
            h = self.downsample(h)  # (B, C, H/2, W/2)
        if self.upsample is not None:
            h = self.upsample(h)  # (B, C, 2H, 2W)
        return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels if double_z else z_channels, H/f, W/f)."""

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        double_z: bool = True,
        attn_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        chans = [base_channels * m for m in (1, *channel_mult)]  # LDM's in_ch_mult = (1,) + ch_mult
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(channel_mult)):
            # no downsampling after the deepest level
            resample: Literal["down"] | None = "down" if i != len(channel_mult) - 1 else None
            attn = i in attn_levels
            self.down.append(
                Level(chans[i], chans[i + 1], num_res_blocks, attn, dropout, norm_groups, resample)
            )
        self.mid = MidBlock(chans[-1], dropout, norm_groups, mid_attention)
        self.norm_out = group_norm(chans[-1], norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, 2*z, H/f, W/f)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f); num_res_blocks+1 blocks/level."""

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        attn_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        top = base_channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = MidBlock(top, dropout, norm_groups, mid_attention)
        # `up[i]` is built deepest-first but indexed like `encoder.down[i]` (LDM's `up.insert(0, ...)`).
        levels: list[Level] = []
        block_in = top
        for i in reversed(range(len(channel_mult))):
            block_out = base_channels * channel_mult[i]
            # no upsampling after the full-resolution level
            resample: Literal["up"] | None = "up" if i != 0 else None
            attn, n_blocks = i in attn_levels, num_res_blocks + 1
            levels.insert(0, Level(block_in, block_out, n_blocks, attn, dropout, norm_groups, resample))
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def trunk(self, z: Tensor) -> Tensor:
        """Everything before the output conv: (B, z, h, w) -> (B, C, h*f, w*f) features."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return F.silu(self.norm_out(h))

    def forward(self, z: Tensor) -> Tensor:
        """(B, z, h, w) -> (B, C_out, h*f, w*f)."""
        return self.conv_out(self.trunk(z))  # ldmlab.accel may compile `trunk` alone (accel.WHOLE says why)


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) from encoder moments (B, 2*C, h, w) = [mean, logvar] along dim 1."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample mean + std * eps, eps ~ N(0, I) drawn from `generator` if given."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The posterior mode (= mean)."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims: shape (B,)."""
        # Closed form: 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling 2014, appendix B).
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return kl.flatten(1).sum(dim=1)


def validate_autoencoder_args(config: dict[str, Any]) -> None:
    """Raise a one-line ValueError naming the offending constructor argument and the fix."""
    c = config
    check_positive(**{k: c[k] for k in ("in_channels", "out_channels", "base_channels", "num_res_blocks",
                                        "z_channels", "embed_dim", "norm_groups")})
    check_levels(c["channel_mult"], "attn_levels", c["attn_levels"])
    # every level's width is base_channels x an integer multiplier: base_channels dividing covers them all
    check_groups({"base_channels": c["base_channels"]}, c["norm_groups"])
    check_dropout(c["dropout"])


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM / SD first stage); defaults are SD's kl-f8 (latents (4, H/8, W/8))."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        embed_dim: int = 4,
        attn_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channel_mult, attn_levels = tuple(channel_mult), tuple(attn_levels)
        # constructor arguments, written into exported weights so a file rebuilds its own architecture
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "base_channels": base_channels,
                       "channel_mult": list(channel_mult), "num_res_blocks": num_res_blocks,
                       "z_channels": z_channels, "embed_dim": embed_dim, "attn_levels": list(attn_levels),
                       "mid_attention": mid_attention, "dropout": dropout, "norm_groups": norm_groups}
        validate_autoencoder_args(self.config)
        self.in_channels, self.embed_dim, self.channel_mult = in_channels, embed_dim, channel_mult
        body = (base_channels, channel_mult, num_res_blocks, z_channels)
        extras = (attn_levels, mid_attention, dropout, norm_groups)
        self.encoder = Encoder(in_channels, *body, True, *extras)  # double_z: moments are [mean, logvar]
        self.decoder = Decoder(out_channels, *body, *extras)
        # 1x1 convs between the encoder's z space and the embed_dim latent space (LDM `quant_conv` naming).
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn activation checkpointing of every ResnetBlock on or off (only active in training mode)."""
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                module.gradient_checkpointing = enabled

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction f between image and latent (8 for kl-f8)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight: the GAN adaptive weight compares gradients w.r.t. it."""
        return self.decoder.conv_out.weight

    def _check_image(self, x: Tensor) -> None:
        """Reject inputs whose shape would silently be changed by the asymmetric-pad downsampling."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}: encode expects (B, {self.in_channels}, H, W)")
        f = self.downsample_factor
        if x.shape[-2] % f != 0 or x.shape[-1] % f != 0:
            raise ValueError(
                f"x has H, W = {tuple(x.shape[-2:])}, not divisible by the downsample factor {f}: "
                f"crop or pad images to multiples of {f}"
            )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image (B, C, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, embed_dim, h, w) -> image (B, C_out, h*f, w*f)."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"z has shape {tuple(z.shape)}: decode expects (B, {self.embed_dim}, h, w)")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x from a posterior sample (or its mode); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
