"""ADM's U-Net options (Dhariwal & Nichol 2021, sec. 3) against diffusers under converted weights: adaptive group
normalisation (`resnet_time_scale_shift="scale_shift"`), BigGAN residual up/downsampling (`resblock_updown`),
heads by width (`head_dim`) and residual blocks per level (`num_res_blocks` as a list); the converter maps each
both ways; the defaults build SD's network."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_unet import SMALL, conditioning, diffusers_out, diffusers_twin, randomized, small
from torch import nn

from ldmlab.convert.unet import (
    diffusers_unet_config,
    infer_unet_config,
    ldmlab_unet_config,
    unet_diffusers_to_ldmlab,
    unet_ldmlab_to_diffusers,
    upgrade_unet_config,
)
from ldmlab.nn.unet import UNetModel
from ldmlab.nn.unet_blocks import ResBlock

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-5, "atol": 1e-5}
ADM = {"resnet_time_scale_shift": "scale_shift", "resblock_updown": True, "num_heads": None, "head_dim": 16,
       "num_res_blocks": [1, 2, 1]}
# diffusers has residual resampling only in blocks without attention (ResnetDownsampleBlock2D /
# ResnetUpsampleBlock2D): with resblock_updown, attention sits in the middle block alone
FULL: dict[str, dict[str, Any]] = {
    "scale_shift-cross-attention": {"context_dim": 24, "resnet_time_scale_shift": "scale_shift"},
    "resblock_updown-class": {"context_dim": None, "num_classes": 10, "attention_levels": (), "resblock_updown": True},
    "head_dim": {"context_dim": 24, "num_heads": None, "head_dim": 8},
    "blocks-per-level": {"context_dim": None, "num_classes": 10, "num_res_blocks": [2, 1, 3]},
    "all-four-class": {**ADM, "context_dim": None, "num_classes": 10, "attention_levels": ()},
    "all-four-text": {**ADM, "context_dim": 24, "attention_levels": ()},
}


def leaf_renamed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One ResBlock's state dict under diffusers' ResnetBlock2D names (the converter's leaf table)."""
    table = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
             "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{table[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v for k, v in sd.items()}


@pytest.mark.parametrize("scale_shift", [False, True], ids=["add", "scale_shift"])
@pytest.mark.parametrize("resample, c_in, c_out", [(None, 16, 32), ("down", 16, 16), ("up", 16, 16)])
def test_resblock_equals_diffusers_resnet_block(scale_shift: bool, resample: str | None, c_in: int, c_out: int) -> None:
    """Our ResBlock = diffusers' ResnetBlock2D(time_embedding_norm, down=, up=) with the same tensors."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ours = ResBlock(c_in, 40, c_out, norm_groups=8, scale_shift=scale_shift, resample=resample)
    with torch.no_grad():  # zero-initialised conv and unit norms would hide a mapping mistake
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p is ours.in_layers[0].weight else 0.0))
    theirs = ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=40, groups=8, eps=1e-5,
                           time_embedding_norm="scale_shift" if scale_shift else "default",
                           down=resample == "down", up=resample == "up")
    theirs.load_state_dict(leaf_renamed(ours.state_dict()), strict=True)
    x, emb = torch.randn(2, c_in, 8, 12), torch.randn(2, 40)
    with torch.no_grad():
        mine, ref = ours(x, emb), theirs(x, emb)
    assert mine.shape == ref.shape == (2, c_out, *{None: (8, 12), "down": (4, 6), "up": (16, 24)}[resample])
    torch.testing.assert_close(mine, ref, **TOL)


def test_scale_shift_is_adaptive_group_norm_in_closed_form() -> None:
    """h = GroupNorm(h)·(1 + y_s) + y_b with [y_s, y_b] = Linear(SiLU(emb)) split in two (ADM sec. 3)."""
    torch.manual_seed(0)
    block = ResBlock(8, 12, 8, norm_groups=4, scale_shift=True)
    nn.init.normal_(block.out_layers[3].weight)  # not the zero init: the branch must show
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 12)
    h = block.in_layers(x)
    y = nn.functional.linear(nn.functional.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias)
    y_s, y_b = y[:, :8, None, None], y[:, 8:, None, None]
    norm = nn.functional.group_norm(h, 4, block.out_layers[0].weight, block.out_layers[0].bias, eps=1e-5)
    expected = x + block.out_layers[3](nn.functional.silu(norm * (1 + y_s) + y_b))
    assert block.emb_layers[1].out_features == 16
    torch.testing.assert_close(block(x, emb), expected, **TOL)


@pytest.mark.parametrize("kw", FULL.values(), ids=FULL.keys())
def test_adm_options_match_unet2dconditionmodel(kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ours = randomized(small(**kw))
    theirs = diffusers_twin(ours)
    x, t = torch.randn(2, 4, 16, 24), torch.tensor([3, 999])
    cond = conditioning(ours, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **cond), diffusers_out(theirs, x, t, cond), **TOL)


class _TembResnet(nn.Module):
    """diffusers' ResnetBlock2D as a resampler inside a CrossAttn block, which calls its resampler without the
    time embedding: the block's `temb` is handed over by a forward pre-hook on the block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.temb = block, None

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.block(h, self.temb)


def _grafted_twin(ours: UNetModel) -> nn.Module:
    """diffusers' UNet2DConditionModel with every conv resampler replaced by diffusers' own ResnetBlock2D(down=True
    / up=True), i.e. the CrossAttn-block-with-residual-resampler that diffusers does not ship."""
    from diffusers.models.resnet import ResnetBlock2D

    theirs = diffusers.UNet2DConditionModel.from_config(diffusers_unet_config({**ours.config, "resblock_updown": False}))
    for block in [*theirs.down_blocks, *theirs.up_blocks]:
        for name in ("downsamplers", "upsamplers"):
            samplers = getattr(block, name, None)
            if not samplers:
                continue
            ch = samplers[0].channels
            graft = _TembResnet(ResnetBlock2D(in_channels=ch, out_channels=ch, temb_channels=4 * ours.model_channels,
                                              groups=ours.config["norm_groups"], eps=1e-5, down=name == "downsamplers",
                                              up=name == "upsamplers",
                                              time_embedding_norm=ours.config["resnet_time_scale_shift"]))
            samplers[0] = graft
            block.register_forward_pre_hook(lambda m, a, kw, g=graft: setattr(g, "temb", kw["temb"]), with_kwargs=True)
    sd = {k.replace("samplers.0.", "samplers.0.block."): v
          for k, v in unet_ldmlab_to_diffusers(ours.state_dict(), ours.config).items()}
    theirs.load_state_dict(sd, strict=True)
    return theirs.eval()


def test_resblock_updown_with_attention_equals_diffusers_parts() -> None:
    """Attention at resampling levels + resblock_updown: no diffusers block type has it, so diffusers' CrossAttn
    blocks get diffusers' residual resamplers grafted in; its export is refused in one line."""
    torch.manual_seed(0)
    ours = randomized(small(**{**ADM, "context_dim": 24}))  # attention at levels 1 and 2 of 3
    theirs = _grafted_twin(ours)
    x, t = torch.randn(2, 4, 16, 8), torch.tensor([5, 640])
    cond = conditioning(ours, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, **cond), diffusers_out(theirs, x, t, cond), **TOL)
    with pytest.raises(ValueError, match=r"^resblock_updown=True with attention at level 1, which resamples: "
                                         r"diffusers has no cross-attention block") as info:
        diffusers_unet_config(ours.config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kw", [*FULL.values(), {**ADM, "context_dim": 24}], ids=[*FULL.keys(), "all-four-attention"])
def test_converter_round_trip_and_config_inference(kw: dict[str, Any]) -> None:
    """ldmlab -> diffusers -> ldmlab is lossless; the SD-layout shapes and a foreign diffusers config give back
    the architecture (heads are not stored in weights: passed in, as the CLI's --num-heads / --head-dim)."""
    ours = randomized(small(**kw))
    sd = ours.state_dict()
    back = unet_diffusers_to_ldmlab(unet_ldmlab_to_diffusers(sd, ours.config), ours.config)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    heads = {"num_heads": ours.config["num_heads"], "head_dim": ours.config["head_dim"]}
    inferred = infer_unet_config(sd, **heads)
    assert inferred == {**ours.config, "norm_groups": 32}  # norm_groups is not in the weights
    if ours.config["resblock_updown"] and ours.config["attention_levels"]:
        return  # no diffusers config exists for it (test above)
    foreign = {k: v for k, v in diffusers_unet_config(ours.config).items() if k != "_ldmlab_config"}
    config = ldmlab_unet_config(foreign)  # head_dim and num_heads may swap where they give the same heads
    assert {k: v for k, v in config.items() if "head" not in k} == {k: v for k, v in ours.config.items() if "head" not in k}
    rebuilt = UNetModel(**config).eval()
    rebuilt.load_state_dict(sd, strict=True)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([50])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, **conditioning(ours, 1)), ours(x, t, **conditioning(ours, 1)), **TOL)


def test_defaults_are_sd15_and_older_configs_upgrade() -> None:
    """The options default to SD's network: same parameters, names and shapes as before they existed; a config
    stored before them (no new keys, num_heads beside head_dim) rebuilds the same architecture."""
    with torch.device("meta"):
        sd15 = UNetModel()
    assert sd15.config["resnet_time_scale_shift"] == "default" and sd15.config["resblock_updown"] is False
    assert sd15.input_blocks[3][0].op.stride == (2, 2) and sd15.output_blocks[2][1].conv.kernel_size == (3, 3)
    assert sd15.input_blocks[1][0].emb_layers[1].out_features == 320
    old = {k: v for k, v in sd15.config.items() if k not in ("resnet_time_scale_shift", "resblock_updown")}
    assert upgrade_unet_config(old) == sd15.config
    sd2_old = {**old, "head_dim": 64, "num_heads": 8}  # written when head_dim silently won over num_heads
    assert upgrade_unet_config(sd2_old) == {**sd15.config, "head_dim": 64, "num_heads": None}
    foreign = {k: v for k, v in diffusers_unet_config(sd15.config).items() if k != "_ldmlab_config"}
    assert foreign["resnet_time_scale_shift"] == "default" and foreign["down_block_types"][-1] == "DownBlock2D"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"resnet_time_scale_shift": "ada_group"}, (r"resnet_time_scale_shift='ada_group' is unknown: use one of "
                                                r"default, scale_shift")),
    ({"resblock_updown": "yes"}, r"resblock_updown='yes' must be true or false"),
    ({"num_res_blocks": [1, 2]}, r"num_res_blocks=\[1, 2\] has 2 entries but channel_mult has 3 levels"),
    ({"num_res_blocks": [1, 0, 1]}, r"num_res_blocks\[1\]=0 must be a positive integer"),
    ({"num_heads": 4, "head_dim": 16}, r"num_heads=4 and head_dim=16: set exactly one of them, the other null"),
])
def test_bad_adm_arguments_are_one_line(kwargs: dict[str, Any], match: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=match) as info:
        UNetModel(**{**SMALL, **kwargs})
    assert "\n" not in str(info.value)


def test_diffusers_config_with_mixed_resampling_is_refused() -> None:
    cfg = {k: v for k, v in diffusers_unet_config(small(context_dim=None, attention_levels=()).config).items()
           if k != "_ldmlab_config"}
    cfg["down_block_types"] = ["ResnetDownsampleBlock2D", "DownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match="mixes residual and conv resampling blocks"):
        ldmlab_unet_config(cfg)
    cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match="down_block_types has SimpleCrossAttnDownBlock2D"):
        ldmlab_unet_config(cfg)
