"""KL autoencoder: SD kl-f8 parameter counts, equality with diffusers, state-dict mapping, posterior closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldmlab.convert.vae import diffusers_to_ldmlab, ldmlab_to_diffusers
from ldmlab.nn.autoencoder import AutoencoderKL, DiagonalGaussian

diffusers = pytest.importorskip("diffusers")

# Exact counts of SD's kl-f8 first stage (= diffusers AutoencoderKL with the SD config below).
# REFERENCE's "encoder 34.16 M, decoder 49.49 M" are the encoder / decoder modules alone; the 1x1 quant_conv (72)
# and post_quant_conv (20) do not change the rounding, so both are asserted separately.
KLF8_ENCODER, KLF8_QUANT = 34_163_592, 72
KLF8_DECODER, KLF8_POST_QUANT = 49_490_179, 20
KLF8_TOTAL = 83_653_863


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_vae(block_out: tuple[int, ...], layers: int, groups: int, **kw: object) -> nn.Module:
    """diffusers AutoencoderKL with plain Down/Up blocks unless block types are given in kw."""
    n = len(block_out)
    kw.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
    kw.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        **kw,
    ).eval()


def randomize_norms(model: nn.Module) -> None:
    """GroupNorm affine params default to (1, 0); perturb them so the mapping of every tensor is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))


def paired(ours: AutoencoderKL, theirs: nn.Module) -> tuple[AutoencoderKL, nn.Module]:
    """Copy our (randomised) weights into the diffusers model through ldmlab_to_diffusers (strict load)."""
    randomize_norms(ours)
    theirs.load_state_dict(ldmlab_to_diffusers(ours.state_dict()), strict=True)
    return ours.eval(), theirs


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-4 relative (atol scaled by the tensor's magnitude for entries near 0)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def assert_matches_diffusers(ours: AutoencoderKL, theirs: nn.Module, x: torch.Tensor) -> None:
    """Posterior mean / logvar and decoder output agree with diffusers' under the same weights."""
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert_close_rel(post.mean, ref.mean)
        assert_close_rel(post.logvar, ref.logvar)
        z = torch.randn_like(post.mean)
        assert_close_rel(ours.decode(z), theirs.decode(z).sample)


@pytest.fixture(scope="module")
def klf8() -> tuple[AutoencoderKL, nn.Module]:
    torch.manual_seed(0)
    return paired(AutoencoderKL(), diffusers_vae((128, 256, 512, 512), layers=2, groups=32))


def test_klf8_parameter_counts(klf8: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, theirs = klf8
    assert n_params(ours.encoder) == KLF8_ENCODER == n_params(theirs.encoder)
    assert n_params(ours.quant_conv) == KLF8_QUANT
    assert n_params(ours.decoder) == KLF8_DECODER == n_params(theirs.decoder)
    assert n_params(ours.post_quant_conv) == KLF8_POST_QUANT
    assert n_params(ours) == KLF8_TOTAL == n_params(theirs)
    assert round(KLF8_ENCODER / 1e6, 2) == 34.16 and round(KLF8_DECODER / 1e6, 2) == 49.49
    assert ours.downsample_factor == 8 and ours.last_layer is ours.decoder.conv_out.weight


def test_klf8_matches_diffusers(klf8: tuple[AutoencoderKL, nn.Module]) -> None:
    torch.manual_seed(1)
    assert_matches_diffusers(*klf8, torch.randn(1, 3, 64, 64))


def test_klf8_names_are_sd_original(klf8: tuple[AutoencoderKL, nn.Module]) -> None:
    """diffusers' own SD-checkpoint converter, fed our state dict as `first_stage_model.*`, gives our mapping."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours, theirs = klf8
    sd = ours.state_dict()
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.block.2.conv2.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    sd_ckpt = {f"first_stage_model.{k}": v for k, v in sd.items()}
    converted = convert_ldm_vae_checkpoint(sd_ckpt, dict(theirs.config))
    ours_mapped = ldmlab_to_diffusers(sd)
    assert converted.keys() == ours_mapped.keys()
    for key, value in converted.items():
        assert torch.equal(value, ours_mapped[key]), key


@pytest.mark.parametrize(
    ("groups", "attn_levels", "mid_attention"),
    [(8, (), True), (32, (1,), False)],
    ids=["plain-groups8", "attn-level1-no-mid-attn"],
)
def test_small_config_matches_diffusers(
    groups: int, attn_levels: tuple[int, ...], mid_attention: bool
) -> None:
    torch.manual_seed(0)
    attn = 1 in attn_levels  # diffusers lists up_blocks deepest-first: level 1 of 2 is up_blocks[0]
    theirs = diffusers_vae(
        (32, 64),
        layers=1,
        groups=groups,
        mid_block_add_attention=mid_attention,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D" if attn else "DownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D" if attn else "UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    ours = AutoencoderKL(
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        norm_groups=groups,
        attn_levels=attn_levels,
        mid_attention=mid_attention,
    )
    ours, theirs = paired(ours, theirs)
    assert n_params(ours) == n_params(theirs)
    assert_matches_diffusers(ours, theirs, torch.randn(2, 3, 16, 16))
    # the other direction: diffusers weights -> ldmlab load strictly and reproduce our own tensors
    back, own = diffusers_to_ldmlab(theirs.state_dict()), ours.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)


def test_round_trip_is_lossless() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(0, 2))
    randomize_norms(model)
    sd = model.state_dict()
    back = diffusers_to_ldmlab(ldmlab_to_diffusers(sd))
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key


def test_old_diffusers_attention_names() -> None:
    """Pre-0.14 diffusers names (query/key/value/proj_attn) map like the current to_q/to_k/to_v/to_out.0."""
    torch.manual_seed(0)
    current = ldmlab_to_diffusers(
        AutoencoderKL(base_channels=32, channel_mult=(1, 2), num_res_blocks=1).state_dict()
    )
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for key, value in current.items():
        for new, legacy in old_names.items():
            key = key.replace(f".{new}", f".{legacy}")
        old[key] = value
    assert any(".proj_attn." in k for k in old)
    new_sd, old_sd = diffusers_to_ldmlab(current), diffusers_to_ldmlab(old)
    assert new_sd.keys() == old_sd.keys()
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in new_sd)


def test_unexpected_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="first_stage_model"):
        ldmlab_to_diffusers({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key"):
        diffusers_to_ldmlab({"encoder.down.0.block.0.norm1.weight": torch.zeros(1)})


# ---------------------------------------------------------------- posterior closed forms


def test_kl_of_standard_normal_is_zero() -> None:
    post = DiagonalGaussian(torch.zeros(3, 8, 4, 4))  # mean 0, logvar 0
    assert torch.equal(post.kl(), torch.zeros(3))


def test_kl_matches_hand_computed_value() -> None:
    mean, logvar = 0.5, math.log(2.0)
    shape, f64 = (2, 4, 3, 5), torch.float64
    moments = torch.cat([torch.full(shape, mean, dtype=f64), torch.full(shape, logvar, dtype=f64)], dim=1)
    per_element = 0.5 * (mean**2 + math.exp(logvar) - 1.0 - logvar)  # KL(N(m, s^2) || N(0, 1))
    expected = torch.full((2,), per_element * 4 * 3 * 5, dtype=torch.float64)
    torch.testing.assert_close(DiagonalGaussian(moments).kl(), expected, rtol=1e-12, atol=0)


def test_logvar_is_clamped() -> None:
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 50.0]).view(1, 2, 1, 1)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))


def test_sample_is_reproducible_and_mode_is_mean() -> None:
    torch.manual_seed(0)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert a.shape == (2, 4, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(post.mode(), post.mean)
    torch.testing.assert_close((a - post.mean) / post.std, (b - post.mean) / post.std)


# ---------------------------------------------------------------- validation and training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel_mult": ()}, r"channel_mult=\[\] is empty"),
        ({"channel_mult": (1, 0)}, r"channel_mult\[1\]=0"),
        ({"base_channels": 48}, r"base_channels=48 is not divisible by norm_groups=32"),
        ({"num_res_blocks": 0}, r"num_res_blocks=0"),
        ({"z_channels": 0}, r"z_channels=0"),
        ({"embed_dim": -1}, r"embed_dim=-1"),
        ({"norm_groups": 0}, r"norm_groups=0"),
        ({"attn_levels": (4,)}, r"attn_levels=\[4\] contains 4.*0\.\.3"),
        ({"base_channels": "128"}, r"base_channels=128 must be a positive integer"),
        ({"dropout": 1.0}, r"dropout=1.0"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        AutoencoderKL(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def tiny(**kw: object) -> AutoencoderKL:
    return AutoencoderKL(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, **kw)  # type: ignore[arg-type]


def test_encode_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="not divisible by the downsample factor 4"):
        tiny().encode(torch.zeros(1, 3, 30, 32))


def test_tiny_forward_backward() -> None:
    torch.manual_seed(0)
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    assert rec.shape == x.shape and post.mean.shape == (2, 4, 8, 8) and model.downsample_factor == 4
    loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
    loss.backward()
    assert model.last_layer.grad is not None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = tiny()
    ckpt = tiny(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 16, 16)
    for model in (plain, ckpt):
        rec, _ = model(x, sample_posterior=False)
        rec.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
