"""Latent-diffusion U-Net: SD1.5 parameter count, equality with diffusers, resolutions, validation."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from ldmlab.convert.unet import diffusers_unet_config, unet_ldmlab_to_diffusers
from ldmlab.nn.embeddings import timestep_embedding
from ldmlab.nn.unet import UNetModel

diffusers = pytest.importorskip("diffusers")

SD15_PARAMS = 859_520_964  # diffusers UNet2DConditionModel with the SD1.x config (REFERENCE: 859.52 M)
SMALL: dict[str, Any] = {
    "model_channels": 32,
    "channel_mult": (1, 2, 2),
    "num_res_blocks": 1,
    "attention_levels": (1, 2),
    "num_heads": 4,
    "norm_groups": 8,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "cross-attention": {"context_dim": 24},
    "class-conditional": {"context_dim": None, "num_classes": 10},
    "self-attention-only": {"context_dim": None},
    "linear-proj-head-dim-depth2": {
        "context_dim": 24,
        "use_linear_projection": True,
        "num_heads": None,
        "head_dim": 16,
        "transformer_depth": 2,
    },
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


POOL_SLACK = 1 << 16  # random window offsets into a shared pool


def _group(module: nn.Module, name: str, p: torch.Tensor) -> tuple[str, int]:
    """Which pool a parameter draws from: norm affines, embeddings, biases, or weights of one fan-in."""
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return f"norm_{name}", 0
    if isinstance(module, nn.Embedding):
        return "embedding", 0
    return ("weight", p[0].numel()) if p.ndim >= 2 else ("bias", 0)


def _pool(group: tuple[str, int], size: int, g: torch.Generator) -> torch.Tensor:
    """U(-1, 1) values scaled for the group: unit-gain weights (Var = 1/fan_in), norm affines near (1, 0)."""
    u = torch.rand(size, generator=g) * 2 - 1
    kind, fan_in = group
    scale = {"weight": math.sqrt(3 / max(fan_in, 1)), "embedding": 1.0}.get(kind, 0.1)
    return u * scale + (1.0 if kind == "norm_weight" else 0.0)


def random_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every parameter of `model` (any device, meta included; LDM zero-inits included).

    Parameters of one group are random windows into one shared pool, so the full SD1.5 U-Net takes ~450 MB
    and about a second instead of 3.4 GB of page faults; tensors of one shape still all differ."""
    g = torch.Generator().manual_seed(seed)
    specs = {
        f"{m}.{n}".lstrip("."): (_group(mod, n, p), p.shape)
        for m, mod in model.named_modules()
        for n, p in mod.named_parameters(recurse=False)
    }
    sizes: dict[tuple[str, int], int] = {}
    for group, shape in specs.values():
        sizes[group] = max(sizes.get(group, 0), shape.numel())
    pools = {group: _pool(group, size + POOL_SLACK, g) for group, size in sizes.items()}
    offsets = torch.randint(POOL_SLACK, (len(specs),), generator=g).tolist()
    return {
        key: pools[group][off : off + shape.numel()].view(shape)
        for (key, (group, shape)), off in zip(specs.items(), offsets)
    }


def randomized(model: UNetModel, seed: int = 0) -> UNetModel:
    """`model` with `random_state` weights assigned (not copied), in eval mode."""
    model.load_state_dict(random_state(model, seed), strict=True, assign=True)
    return model.eval()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Equal within 1e-4 relative (atol scaled by the tensor's magnitude); returns the max abs deviation."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    return (actual - expected).abs().max().item()


def small(**kw: Any) -> UNetModel:
    return UNetModel(**{**SMALL, **kw})


def conditioning(model: UNetModel, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random context / class labels for whatever the model is conditioned on (`null_class` included)."""
    g = torch.Generator().manual_seed(seed)
    cond: dict[str, torch.Tensor] = {}
    if model.context_dim is not None:
        cond["context"] = torch.randn(batch, 7, model.context_dim, generator=g)
    if model.null_class is not None:
        cond["class_labels"] = torch.arange(batch) % model.null_class  # labels 0..num_classes-1
        cond["class_labels"][-1] = model.null_class  # and the unconditional one
    return cond


def diffusers_twin(model: UNetModel) -> nn.Module:
    """diffusers UNet2DConditionModel built from our config, weights copied through the converter (strict)."""
    theirs = diffusers.UNet2DConditionModel.from_config(diffusers_unet_config(model.config)).eval()
    theirs.load_state_dict(unet_ldmlab_to_diffusers(model.state_dict(), model.config), strict=True)
    return theirs


def diffusers_out(
    theirs: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
) -> torch.Tensor:
    return theirs(x, t, cond.get("context"), class_labels=cond.get("class_labels")).sample


# ---------------------------------------------------------------- SD1.5


def test_sd15_parameter_count() -> None:
    with torch.device("meta"):
        ours = UNetModel()
        theirs = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.x config
    assert n_params(ours) == SD15_PARAMS == n_params(theirs)
    assert round(SD15_PARAMS / 1e6, 2) == 859.52
    assert ours.config == json.loads(json.dumps(ours.config))


@pytest.mark.slow
def test_sd15_matches_diffusers() -> None:
    """Full SD1.5 U-Net at 1x4x8x8 latents with a 77x768 context; diffusers is built on the meta device and
    takes our tensors (assign=True), so only one copy of the 3.4 GB of weights exists."""
    with torch.device("meta"):
        ours = UNetModel()
        theirs = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    ours = randomized(ours)
    theirs.load_state_dict(unet_ldmlab_to_diffusers(ours.state_dict(), ours.config), strict=True, assign=True)
    assert not any(t.is_meta for t in [*theirs.parameters(), *theirs.buffers()])
    g = torch.Generator().manual_seed(1)
    x, t, context = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([981]),
        torch.randn(1, 77, 768, generator=g),
    )
    with torch.no_grad():
        assert_close_rel(ours(x, t, context), theirs.eval()(x, t, context).sample)


# ---------------------------------------------------------------- small configs against diffusers


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_small_config_matches_diffusers(kw: dict[str, Any]) -> None:
    torch.manual_seed(0)
    ours = randomized(small(**kw))
    theirs = diffusers_twin(ours)
    assert n_params(theirs) == n_params(ours) + (0 if ours.context_dim else _zero_attn2_params(theirs))
    x, t = torch.randn(2, 4, 16, 24), torch.tensor([3, 999])
    cond = conditioning(ours, 2)
    with torch.no_grad():
        assert_close_rel(ours(x, t, **cond), diffusers_out(theirs, x, t, cond))


def _zero_attn2_params(theirs: nn.Module) -> int:
    """Parameters of the all-zero attn2/norm2 the export adds to a self-attention-only U-Net."""
    extra = [
        p for n, p in theirs.named_parameters() if re.search(r"\.transformer_blocks\.\d+\.(attn2|norm2)\.", n)
    ]
    assert all(torch.count_nonzero(p) == 0 for n, p in theirs.named_parameters() if ".attn2." in n)
    return sum(p.numel() for p in extra)


def test_same_weights_at_two_resolutions() -> None:
    torch.manual_seed(0)
    ours = randomized(small(context_dim=None, num_classes=10))
    theirs = diffusers_twin(ours)
    for h, w in [(16, 16), (24, 32)]:
        x, t = torch.randn(2, 4, h, w), torch.tensor([10, 500])
        cond = conditioning(ours, 2)
        with torch.no_grad():
            out = ours(x, t, **cond)
            assert out.shape == (2, 4, h, w)
            assert_close_rel(out, diffusers_out(theirs, x, t, cond))


def test_timestep_embedding_matches_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 37, 999])
    for dim in (320, 33):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.equal(timestep_embedding(t, dim), ref)
    assert torch.equal(timestep_embedding(t.float(), 8), timestep_embedding(t, 8))  # int or float timesteps


# ---------------------------------------------------------------- behaviour


def test_zero_init_output_and_config_rebuild() -> None:
    """LDM zero-inits the residual branches' last layers and the output conv: a fresh U-Net outputs zeros."""
    model = small(context_dim=None, num_classes=3)
    out = model(
        torch.randn(2, 4, 8, 8), torch.tensor(5), class_labels=torch.tensor([0, 3])
    )  # scalar t broadcasts
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))
    assert model.null_class == 3 and model.label_emb.num_embeddings == 4 and small().null_class is None
    twin = UNetModel(**json.loads(json.dumps(model.config)))
    assert {k: v.shape for k, v in twin.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = randomized(small(context_dim=24)).train()
    ckpt = small(context_dim=24, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([1, 700]), conditioning(plain, 2)
    for model in (plain, ckpt):
        model(x, t, **cond).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    ckpt.set_gradient_checkpointing(False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel_mult": ()}, r"channel_mult=\[\] is empty"),
        ({"channel_mult": (1, 0)}, r"channel_mult\[1\]=0"),
        ({"model_channels": 48}, r"model_channels=48 is not divisible by norm_groups=32"),
        ({"norm_groups": 0}, r"norm_groups=0 must be a positive integer"),
        ({"num_heads": 3}, r"num_heads=3 does not divide the attention width 320 \(model_channels x channel_m"),
        ({"num_heads": None, "head_dim": 48}, r"head_dim=48 does not divide the attention width 320"),
        ({"head_dim": 64}, r"num_heads=8 and head_dim=64: set exactly one of them, the other null"),
        ({"num_heads": None}, r"num_heads=None and head_dim=None: set exactly one of them"),
        # no attention level: the middle block's transformer still runs at the deepest width
        ({"attention_levels": (), "num_heads": 3, "model_channels": 64, "channel_mult": (1, 2)},
         r"num_heads=3 does not divide the attention width 128 \(model_channels x channel_mult\[1\]\)"),
        ({"attention_levels": (4,)}, r"attention_levels=\[4\] contains 4.*0\.\.3"),
        ({"model_channels": "64"}, r"model_channels=64 must be a positive integer"),
        ({"num_classes": 0}, r"num_classes=0 must be a positive integer"),
        ({"num_res_blocks": 0}, r"num_res_blocks=0"),
        ({"context_dim": 0}, r"context_dim=0"),
        ({"dropout": 1.0}, r"dropout=1.0"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=match) as info:
        UNetModel(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kw", "inputs", "match"),
    [
        (
            {"context_dim": None},
            {"x": (1, 4, 10, 16)},
            r"H, W = \(10, 16\), not divisible by 2\^\(levels-1\) = 4",
        ),
        ({"context_dim": None}, {"x": (1, 3, 8, 8)}, r"expects \(B, 4, H, W\)"),
        ({"context_dim": 24}, {}, r"context is None: this U-Net has context_dim=24"),
        ({"context_dim": 24}, {"context": (1, 7, 16)}, r"context is \(1, 7, 16\)"),
        ({"context_dim": None}, {"context": (1, 7, 24)}, r"context was given but context_dim=None"),
        ({"context_dim": None, "num_classes": 5}, {}, r"class_labels is None but num_classes=5"),
        ({"context_dim": None}, {"class_labels": (1,)}, r"class_labels was given but num_classes=None"),
        ({"context_dim": None}, {"t": (2,)}, r"t has shape \(2,\)"),
    ],
)
def test_invalid_inputs_raise(kw: dict[str, Any], inputs: dict[str, tuple[int, ...]], match: str) -> None:
    model = small(**kw)
    args = {"x": torch.zeros(inputs.get("x", (1, 4, 8, 8))), "t": torch.zeros(inputs.get("t", (1,)))}
    if "context" in inputs:
        args["context"] = torch.zeros(inputs["context"])
    if "class_labels" in inputs:
        args["class_labels"] = torch.zeros(inputs["class_labels"], dtype=torch.long)
    with pytest.raises(ValueError, match=match) as info:
        model(**args)
    assert "\n" not in str(info.value)


def test_first_level_wider_than_model_channels() -> None:
    """channel_mult[0] > 1: the output head normalises level 0's width (it assumed model_channels before)."""
    model = small(context_dim=None, channel_mult=(2, 2), attention_levels=(1,))
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([3]))
    assert out.shape == (1, 4, 8, 8)
    assert model.out[0].num_channels == model.out[2].in_channels == 2 * SMALL["model_channels"]
