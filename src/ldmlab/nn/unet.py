"""Latent-diffusion U-Net (LDM `openaimodel.UNetModel` with `SpatialTransformer`s), as a plain `nn.Module`.

State-dict names follow SD-original (`time_embed.0`, `input_blocks.1.0.in_layers.0`,
`input_blocks.1.1.proj_in`, `middle_block.1.transformer_blocks.0.attn2.to_k`, `output_blocks.2.1.conv`,
`out.2`, ...): an SD checkpoint's `model.diffusion_model.*` entries load after stripping that prefix.
Defaults are SD1.5's U-Net (859,520,964 parameters).

Layout for L = len(channel_mult) levels and n_l = num_res_blocks (one count, or one per level):
- `input_blocks.0` conv_in; then per level n_l x [ResBlock, SpatialTransformer if attention], and a Downsample
  after every level but the last: 1 + sum(n_l) + (L-1) entries, each output saved as a skip.
- `middle_block`: ResBlock, SpatialTransformer, ResBlock (always with attention, as in SD).
- `output_blocks`: per level, deepest first, (n_l+1) x [ResBlock(C + skip), SpatialTransformer if attention],
  Upsample after the last block of every level but level 0.
With `resblock_updown` each Downsample / Upsample is a ResBlock that resamples (ADM; LDM openaimodel's names).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ldmlab.nn.attention import SpatialTransformer, zero_module
from ldmlab.nn.checks import check_dropout, check_groups, check_levels, check_positive
from ldmlab.nn.embeddings import timestep_embedding
from ldmlab.nn.unet_blocks import Downsample, EmbedSequential, Resample, ResBlock, Upsample, group_norm

TIME_EMBED_MULT = 4  # LDM: time_embed_dim = 4 * model_channels (320 -> 1280 in SD)
POSITIVE_ARGS = ("in_channels", "out_channels", "model_channels", "num_heads", "head_dim", "transformer_depth",
                 "context_dim", "num_classes", "norm_groups")
TIME_SCALE_SHIFTS = ("default", "scale_shift")  # diffusers' resnet_time_scale_shift values


def blocks_per_level(num_res_blocks: int | Sequence[int], levels: int) -> list[int]:
    """Residual blocks of each level: one count for all (SD), or one per level (LDM / diffusers accept both)."""
    return [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)


def _is_list(value: object) -> bool:
    """A list-like config value (list, tuple, OmegaConf ListConfig), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, str)


def _check_res_blocks(num_res_blocks: int | Sequence[int], levels: int) -> None:
    """num_res_blocks is a positive integer, or one positive integer per level."""
    if not _is_list(num_res_blocks):
        check_positive(num_res_blocks=num_res_blocks)
        return
    assert isinstance(num_res_blocks, Sequence)
    if len(num_res_blocks) != levels:
        raise ValueError(f"num_res_blocks={list(num_res_blocks)} has {len(num_res_blocks)} entries but channel_mult "
                         f"has {levels} levels: give one count per level, or one integer for all")
    for i, n in enumerate(num_res_blocks):
        check_positive(**{f"num_res_blocks[{i}]": n})


def _check_heads(
    model_channels: int, channel_mult: Sequence[int], attention_levels: Sequence[int], num_heads: int | None,
    head_dim: int | None,
) -> None:
    """Exactly one of num_heads (heads per layer) and head_dim (channels per head, ADM's num_head_channels) is
    set, and it splits every attention width."""
    if (num_heads is None) == (head_dim is None):
        raise ValueError(f"num_heads={num_heads} and head_dim={head_dim}: set exactly one of them, the other null "
                         "(num_heads: heads per attention layer, e.g. 8; head_dim: channels per head, e.g. 64)")
    key, size = ("head_dim", head_dim) if head_dim is not None else ("num_heads", num_heads)
    assert size is not None  # one of the two, checked above
    # the middle block's transformer runs at the last level's width, attention level or not (as in SD)
    for level in sorted({*attention_levels, len(channel_mult) - 1}):
        channels = model_channels * channel_mult[level]
        if channels % size:
            raise ValueError(
                f"{key}={size} does not divide the attention width {channels} (model_channels x "
                f"channel_mult[{level}]): choose {key} dividing it, e.g. {math.gcd(channels, 8)}"
            )


def _check_adm_options(time_scale_shift: object, resblock_updown: object) -> None:
    """The ADM switches take their documented values."""
    if time_scale_shift not in TIME_SCALE_SHIFTS:
        raise ValueError(f"resnet_time_scale_shift={time_scale_shift!r} is unknown: use one of "
                         f"{', '.join(TIME_SCALE_SHIFTS)} (scale_shift: ADM's adaptive group normalisation)")
    if type(resblock_updown) is not bool:  # a config value: a ValueError naming the field, as for the others
        raise ValueError(f"resblock_updown={resblock_updown!r} must be true or false (true: BigGAN residual "
                         "up/downsampling blocks, as in ADM)")


def validate_unet_args(config: dict[str, Any]) -> None:
    """Raise a one-line ValueError naming the offending constructor argument and the fix."""
    c = config
    check_positive(**{k: c[k] for k in POSITIVE_ARGS if k in c})
    check_levels(c["channel_mult"], "attention_levels", c["attention_levels"])
    _check_res_blocks(c["num_res_blocks"], len(c["channel_mult"]))
    # every width is model_channels x an integer multiplier: model_channels dividing covers them all
    check_groups({"model_channels": c["model_channels"]}, c["norm_groups"])
    _check_heads(c["model_channels"], c["channel_mult"], c["attention_levels"], c["num_heads"], c["head_dim"])
    _check_adm_options(c["resnet_time_scale_shift"], c["resblock_updown"])
    check_dropout(c["dropout"])


class UNetEncoder(nn.Module):
    """The U-Net up to the U-turn: time (and class) embedding, input blocks, middle block (LDM / SD names).

    `UNetModel` adds the output blocks to it; ADM's noise-aware classifier (`ldmlab.nn.noisy_classifier`) adds a
    pooled head. Arguments as `UNetModel`'s.
    """

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[int] = (0, 1, 2),
        num_heads: int | None = 8,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int | None = 768,
        num_classes: int | None = None,
        dropout: float = 0.0,
        use_linear_projection: bool = False,
        norm_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        resblock_updown: bool = False,
        gradient_checkpointing: bool = False,
        noise_level_embed: bool = False,
    ) -> None:
        super().__init__()
        # architecture arguments, written into exported weights so a file rebuilds its own model
        # (gradient_checkpointing is a training-time switch, left out as in AutoencoderKL.config)
        self.config: dict[str, Any] = {
            "in_channels": in_channels,
            "model_channels": model_channels,
            "channel_mult": list(channel_mult),
            # a list as given (one per level), anything else as it is, for the checks to name
            "num_res_blocks": list(cast(Sequence[int], num_res_blocks)) if _is_list(num_res_blocks) else num_res_blocks,
            "attention_levels": list(attention_levels),
            "num_heads": num_heads,
            "head_dim": head_dim,
            "transformer_depth": transformer_depth,
            "context_dim": context_dim,
            "num_classes": num_classes,
            "dropout": dropout,
            "use_linear_projection": use_linear_projection,
            "norm_groups": norm_groups,
            "resnet_time_scale_shift": resnet_time_scale_shift,
            "resblock_updown": resblock_updown,
            "noise_level_embed": noise_level_embed,
        }
        validate_unet_args(self.config)
        self.in_channels, self.model_channels = in_channels, model_channels
        self.channel_mult, self.attention_levels = tuple(channel_mult), tuple(attention_levels)
        self.context_dim, self.num_classes = context_dim, num_classes
        self.blocks_per_level = blocks_per_level(num_res_blocks, len(self.channel_mult))
        emb = model_channels * TIME_EMBED_MULT
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        if num_classes is not None:
            # one extra row: index num_classes is the learned "null" label of classifier-free guidance
            self.label_emb = nn.Embedding(num_classes + 1, emb)
        if noise_level_embed:
            # a second timestep embedding for the augmentation level of a super-resolution condition (cascaded
            # diffusion, Ho et al. 2021, sec. 4.2), added to the time embedding: diffusers' class_embed_type="timestep"
            self.level_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.skip_channels = self._build_input_blocks(emb)
        top = model_channels * self.channel_mult[-1]
        self.middle_block = EmbedSequential(
            [self._res(top, top, emb), self._transformer(top), self._res(top, top, emb)]
        )
        self.set_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ construction

    def _res(self, channels: int, out_channels: int, emb: int, resample: Resample = None) -> ResBlock:
        c = self.config
        return ResBlock(channels, emb, out_channels, c["dropout"], c["norm_groups"],
                        c["resnet_time_scale_shift"] == "scale_shift", resample)

    def _transformer(self, channels: int) -> SpatialTransformer:
        """SpatialTransformer at this width: channels // head_dim heads if head_dim is set, else num_heads."""
        c = self.config
        heads = channels // c["head_dim"] if c["head_dim"] else c["num_heads"]
        return SpatialTransformer(
            channels,
            heads,
            channels // heads,
            c["transformer_depth"],
            c["context_dim"],
            c["dropout"],
            c["norm_groups"],
            c["use_linear_projection"],
        )

    def _resampler(self, channels: int, emb: int, direction: Literal["up", "down"]) -> nn.Module:
        """A level's 2x resampling: LDM's conv (Upsample / Downsample), or ADM's residual block around it."""
        if self.config["resblock_updown"]:
            return self._res(channels, channels, emb, direction)
        return Upsample(channels) if direction == "up" else Downsample(channels)

    def _build_input_blocks(self, emb: int) -> list[int]:
        """Fill `input_blocks`; returns the channel count of every skip they produce, in order."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(self.in_channels, mc, 3, padding=1)])])
        skips, ch = [mc], mc
        for level, (mult, n) in enumerate(zip(self.channel_mult, self.blocks_per_level)):
            for _ in range(n):
                layers: list[nn.Module] = [self._res(ch, mc * mult, emb)]
                ch = mc * mult
                if level in self.attention_levels:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(EmbedSequential(layers))
                skips.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(EmbedSequential([self._resampler(ch, emb, "down")]))
                skips.append(ch)
        return skips

    # ------------------------------------------------------------------ public surface

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional ("null") class for classifier-free guidance; None without classes."""
        return self.num_classes

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction between input and deepest level: H and W must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn activation checkpointing of every ResBlock and SpatialTransformer on/off (training only)."""
        for module in self.modules():
            if isinstance(module, (ResBlock, SpatialTransformer)):
                module.gradient_checkpointing = enabled

    def _check_inputs(
        self, x: Tensor, t: Tensor, context: Tensor | None, class_labels: Tensor | None,
        noise_level: Tensor | None = None,
    ) -> None:
        """One-line ValueErrors for inputs the network cannot take."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x (with any concat channels) has shape {tuple(x.shape)}: the U-Net expects "
                             f"(B, {self.in_channels}, H, W)")
        if (noise_level is None) == self.config["noise_level_embed"]:
            raise ValueError(f"noise_level is {'None' if noise_level is None else 'given'} but noise_level_embed="
                             f"{self.config['noise_level_embed']}: pass noise_level (B,) exactly when it is True")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"x has H, W = {tuple(x.shape[-2:])}, not divisible by 2^(levels-1) = {f}: "
                f"crop or pad latents to multiples of {f}"
            )
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t has shape {tuple(t.shape)}: give one timestep per sample, shape ({x.shape[0]},)"
            )
        if self.context_dim is not None and (context is None or context.shape[-1] != self.context_dim):
            got = "None" if context is None else tuple(context.shape)
            raise ValueError(
                f"context is {got}: this U-Net has context_dim={self.context_dim}, pass "
                f"context of shape (B, S, {self.context_dim})"
            )
        if self.context_dim is None and context is not None:
            raise ValueError(
                "context was given but context_dim=None (self-attention only): "
                "drop context or build the U-Net with context_dim set"
            )
        if self.num_classes is not None and class_labels is None:
            raise ValueError(
                f"class_labels is None but num_classes={self.num_classes}: pass labels (B,), "
                f"using null_class={self.null_class} for unconditional samples"
            )
        if self.num_classes is None and class_labels is not None:
            raise ValueError("class_labels was given but num_classes=None: build the U-Net with num_classes")

    def _encode(
        self, x: Tensor, t: Tensor, context: Tensor | None, class_labels: Tensor | None,
        concat: Tensor | None = None, noise_level: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(middle block output, time + class (+ noise level) embedding (B, 4*mc), the input blocks' outputs).

        concat (B, C_extra, H, W): image-condition channels appended after x (SR3's upsampled low-res image,
        SD-inpainting's mask + masked-image latent: diffusers' cat([x, mask, masked], 1)); noise_level (B,): the
        augmentation level of that condition, for a U-Net built with noise_level_embed."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C + C_extra, H, W)
        self._check_inputs(x, t, context, class_labels, noise_level)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (B, 4*mc)
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        if noise_level is not None:
            emb = emb + self.level_embed(timestep_embedding(noise_level, self.model_channels).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), emb, skips

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, class_labels: Tensor | None = None,
        concat: Tensor | None = None, noise_level: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps, context (B, S, D), class_labels (B,) -> (B, C_top, H/f, W/f)."""
        return self._encode(x, t, context, class_labels, concat, noise_level)[0]


class UNetModel(UNetEncoder):
    """Text-, class- or unconditional latent U-Net (LDM / SD); defaults are SD1.5's 859.52 M-param U-Net.

    ADM's options (Dhariwal & Nichol 2021, sec. 3), off by default: `resnet_time_scale_shift="scale_shift"`
    (adaptive group normalisation), `resblock_updown` (BigGAN residual up/downsampling), `head_dim` (a fixed
    width per attention head, ADM's and LDM's `num_head_channels`, instead of `num_heads` heads) and
    `num_res_blocks` per level (a list, as LDM's and diffusers' `layers_per_block` accept).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int | Sequence[int] = 2,
        attention_levels: Sequence[int] = (0, 1, 2),
        num_heads: int | None = 8,
        head_dim: int | None = None,
        transformer_depth: int = 1,
        context_dim: int | None = 768,
        num_classes: int | None = None,
        dropout: float = 0.0,
        use_linear_projection: bool = False,
        norm_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        resblock_updown: bool = False,
        gradient_checkpointing: bool = False,
        noise_level_embed: bool = False,
    ) -> None:
        check_positive(out_channels=out_channels)
        super().__init__(in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                         head_dim, transformer_depth, context_dim, num_classes, dropout, use_linear_projection,
                         norm_groups, resnet_time_scale_shift, resblock_updown, noise_level_embed=noise_level_embed)
        self.config = {"in_channels": in_channels, "out_channels": out_channels, **self.config}  # SD's key order
        emb = model_channels * TIME_EMBED_MULT
        self._build_output_blocks(emb, list(self.skip_channels))
        first = model_channels * self.channel_mult[0]  # the output blocks end at level 0's width
        self.out = nn.Sequential(
            group_norm(first, norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(first, out_channels, 3, padding=1)),
        )
        self.set_gradient_checkpointing(gradient_checkpointing)

    def _build_output_blocks(self, emb: int, skips: list[int]) -> None:
        """Fill `output_blocks`, consuming the skip widths deepest first: n + 1 blocks per level of n."""
        mc = self.model_channels
        self.output_blocks = nn.ModuleList()
        ch = mc * self.channel_mult[-1]
        for level in reversed(range(len(self.channel_mult))):
            n = self.blocks_per_level[level]
            for i in range(n + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), mc * self.channel_mult[level], emb)]
                ch = mc * self.channel_mult[level]
                if level in self.attention_levels:
                    layers.append(self._transformer(ch))
                if level and i == n:
                    layers.append(self._resampler(ch, emb, "up"))
                self.output_blocks.append(EmbedSequential(layers))

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, class_labels: Tensor | None = None,
        concat: Tensor | None = None, noise_level: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps, context (B, S, D), class_labels (B,) -> (B, C_out, H, W); concat and
        noise_level: an image condition's channels and augmentation level (UNetEncoder._encode)."""
        h, emb, skips = self._encode(x, t, context, class_labels, concat, noise_level)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W), LDM order [h, skip]
            # an Upsample ending this block targets the next skip's size (any H, W divisible by 2^(L-1))
            h = block(h, emb, context, size=_size(skips[-1]) if skips else None)
        return self.out(h)


def _size(t: Tensor) -> tuple[int, int]:
    """Spatial size (H, W) of a (B, C, H, W) tensor."""
    return int(t.shape[-2]), int(t.shape[-1])
