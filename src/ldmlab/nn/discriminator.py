"""PatchGAN discriminator (pix2pix, Isola et al. 2017) as used by taming-transformers and LDM's VAE losses.

Mirrors taming `modules/discriminator/model.py` (`NLayerDiscriminator`, `weights_init`) and
`modules/losses/vqperceptual.py`'s `ActNorm`; the Sequential is called `main` so state-dict keys match taming's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ldmlab.nn.checks import check_positive

NORMS = ("batch", "actnorm", "group", "none")


class ActNorm(nn.Module):
    """Per-channel affine layer with data-dependent init (Glow, Kingma & Dhariwal 2018, Sec. 3.1; taming ActNorm)."""

    initialized: Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        # A buffer (not a Python flag) so the "already initialised" state survives checkpoints, as in taming.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set loc/scale so this batch's output has zero mean and unit (unbiased) std per channel."""
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, B·H·W)
        mean = flat.mean(dim=1).view(1, -1, 1, 1)
        std = flat.std(dim=1).view(1, -1, 1, 1)
        self.loc.copy_(-mean)
        self.scale.copy_(1.0 / (std + 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        """scale · (x + loc); initialises from x on the first training forward."""
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)
        return self.scale * (x + self.loc)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name: batch | actnorm | group | none."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "actnorm":
        return ActNorm(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # 32 groups when channels allow (≥ 32, pow 2)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown discriminator norm {norm!r}; valid: {', '.join(NORMS)}")


def weights_init(m: nn.Module) -> None:
    """taming `weights_init`: conv weights ~ N(0, 0.02); norm weights ~ N(1, 0.02), norm biases 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: 4×4 convs, n_layers stride-2 then one stride-1 block, 1-channel patch logits (B,1,h,w)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown discriminator norm {norm!r}; valid: {', '.join(NORMS)}")
        check_positive(in_channels=in_channels, base_channels=base_channels, n_layers=n_layers)
        bias = norm == "none"  # a conv bias right before a norm layer is redundant (its shift absorbs it)
        kw, pad = 4, 1
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, kw, stride=2, padding=pad),
                                   nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)  # channel multiplier capped at 8 (pix2pix)
            stride = 2 if n < n_layers else 1  # the last block keeps resolution (70×70 receptive field for n=3)
            layers += [nn.Conv2d(base_channels * prev, base_channels * mult, kw, stride=stride, padding=pad,
                                 bias=bias),
                       make_norm(norm, base_channels * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(base_channels * mult, 1, kw, stride=1, padding=pad))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """(B,C,H,W) images → (B,1,h,w) real/fake logits per patch."""
        return self.main(x)
