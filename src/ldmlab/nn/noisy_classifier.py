"""ADM's noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4.1; guided-
diffusion's `EncoderUNetModel`): the U-Net's encoder half, built by `UNetEncoder` (time embedding, input blocks,
middle block), then a pooled head (ADM's `pool="adaptive"`: GroupNorm, SiLU, global average pool) and a linear
layer to K logits. Global pooling makes it take any latent size its levels divide."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ldmlab.nn.unet import UNetEncoder
from ldmlab.nn.unet_blocks import group_norm

NOT_ENCODER_ARGS = ("context_dim", "num_classes")  # a classifier sees (x_t, t) only


class NoisyClassifier(nn.Module):
    """(x_t, t) → logits over `num_classes`; `encoder_args` are `UNetEncoder`'s (= `UNetModel`'s) size arguments."""

    def __init__(self, num_classes: int, **encoder_args: Any) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be an integer >= 2: the classes guidance steers towards")
        if given := [k for k in NOT_ENCODER_ARGS if k in encoder_args]:
            raise ValueError(f"{given[0]}={encoder_args[given[0]]} is not a classifier argument: it sees (x_t, t) "
                             f"only; num_classes counts its output logits")
        self.encoder = UNetEncoder(**encoder_args, context_dim=None, num_classes=None)
        top = self.encoder.model_channels * self.encoder.channel_mult[-1]
        self.head = nn.Sequential(group_norm(top, self.encoder.config["norm_groups"]), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(top, num_classes))
        # architecture arguments, written into exported weights so a file rebuilds its own classifier
        encoder = {k: v for k, v in self.encoder.config.items() if k not in NOT_ENCODER_ARGS}
        self.config: dict[str, Any] = {"num_classes": num_classes, **encoder}
        self.num_classes = num_classes

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the encoder: latent H and W must be multiples of it."""
        return self.encoder.downsample_factor

    @property
    def channel_mult(self) -> tuple[int, ...]:
        """The encoder's channel multipliers (one per level)."""
        return self.encoder.channel_mult

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x_t (B, C, H, W), t (B,) the denoiser's timesteps → (B, num_classes) logits."""
        return self.head(self.encoder(x, t))
