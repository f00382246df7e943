"""LoRA adapters (ldmlab.finetune): exact step 0, frozen base, merge round trip, PEFT/kohya files both ways."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldmlab.finetune.lora import (
    CONVOLUTIONS,
    FEED_FORWARD,
    TEXT_ENCODER,
    add_lora,
    base_state_dict,
    load_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
    unmerge_lora,
)
from ldmlab.finetune.lora_formats import load_lora_file, save_lora, save_lora_diffusers, save_lora_kohya
from ldmlab.nn.unet import UNetModel

# one pattern per kind of layer: attention (self and cross), feed-forward, 3x3 conv, 1x1 conv
ALL_KINDS = (r".*attn[12]\.to_(q|k|v|out\.0)", r".*ff\.net\.(0\.proj|2)", r".*in_layers\.2", r".*proj_in")
CONFIG = {"model_channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_levels": (1,),
          "num_heads": 4, "context_dim": 16}


def small_unet(**kw) -> UNetModel:
    torch.manual_seed(0)
    model = UNetModel(**{**CONFIG, **kw})
    with torch.no_grad():  # as if pretrained: zero-initialised outputs (proj_out, out_layers.3) block gradients
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.02)
    return model


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, 16, generator=g)


def trained(rank: int = 4, alpha: float = 8.0, targets=None) -> UNetModel:
    """A U-Net with adapters whose B is non-zero (as after training)."""
    model = small_unet()
    add_lora(model, rank, alpha, **({"targets": targets} if targets else {}))
    torch.manual_seed(2)
    for _, lora in lora_modules(model):
        torch.nn.init.normal_(lora.B.weight, std=0.02)
    return model


def test_step_zero_is_the_base_model_exactly() -> None:
    model, (x, t, c) = small_unet(), inputs()
    base = model(x, t, c)
    names = add_lora(model, 4, 8.0, targets=(*FEED_FORWARD, *CONVOLUTIONS, r".*attn2\.to_k"))
    assert any(n.endswith("in_layers.2") for n in names) and any(n.endswith("ff.net.2") for n in names)
    assert torch.equal(model(x, t, c), base)


def test_default_targets_are_the_attention_projections() -> None:
    names = add_lora(small_unet(), 4, 4.0)
    leaves = {re.sub(r".*\.(attn[12])\.", r"\1.", n) for n in names}
    assert leaves == {f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}


def test_adapters_live_on_the_base_layers_device() -> None:
    """Every adapter tensor, alpha included, follows its base layer (the meta device stands in for a GPU: a CPU
    scalar in a CUDA model makes inductor skip CUDA graphs)."""
    model = small_unet().to("meta")
    add_lora(model, 4, 8.0)
    devices = {n: t.device.type for n, t in lora_state_dict(model).items()}
    assert devices and set(devices.values()) == {"meta"}, devices


def test_only_adapters_train_and_the_base_stays_bit_identical() -> None:
    model, (x, t, c) = small_unet(), inputs()
    add_lora(model, 4, 8.0, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert len(trainable) == len(lora_parameters(model))
    add_lora(model, 2, 2.0, targets=FEED_FORWARD)  # a second call keeps the first adapters trainable
    assert all(p.requires_grad for p in lora_parameters(model)) and len(lora_parameters(model)) > len(trainable)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(3):
        model(x, t, c).square().mean().backward()
        opt.step(), opt.zero_grad()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert base_state_dict(model).keys() == small_unet().state_dict().keys()
    after = lora_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("B.weight"))


def test_merge_unmerge_and_scale() -> None:
    model, (x, t, c) = trained(targets=(r".*attn1\.to_q", *CONVOLUTIONS)), inputs()
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if ".lora." not in k}
    adapted = model(x, t, c)
    set_lora_scale(model, 0.0)
    assert torch.equal(model(x, t, c), small_unet()(x, t, c))
    set_lora_scale(model, 1.0)
    assert torch.equal(model(x, t, c), adapted)
    merge_lora(model)
    assert torch.allclose(model(x, t, c), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge_lora first"):
        set_lora_scale(model, 0.5)
    unmerge_lora(model)
    for k, v in base_weights.items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    assert torch.allclose(model(x, t, c), adapted, atol=1e-5)


@pytest.mark.parametrize("save", [save_lora, save_lora_diffusers, save_lora_kohya])
def test_files_load_back_into_a_fresh_model(tmp_path, save) -> None:
    model, (x, t, c) = trained(rank=3, alpha=5.0, targets=(r".*attn2\.to_(q|out\.0)", r".*in_layers\.2")), inputs()
    save(tmp_path / "lora.safetensors", model)
    fresh = small_unet()
    names = load_lora_file(tmp_path / "lora.safetensors", fresh)  # adds the file's adapters
    assert sorted(names) == sorted(n for n, _ in lora_modules(model))
    assert torch.equal(fresh(x, t, c), model(x, t, c))
    again = small_unet()
    add_lora(again, 3, 1.0, targets=(r".*attn2\.to_(q|out\.0)", r".*in_layers\.2"))
    load_lora_file(tmp_path / "lora.safetensors", again)  # into existing adapters: alpha from the file
    assert torch.equal(again(x, t, c), model(x, t, c))


def test_kohya_and_peft_key_names(tmp_path) -> None:
    model = trained(rank=2, alpha=2.0)
    save_lora_kohya(tmp_path / "k.safetensors", model)
    save_lora_diffusers(tmp_path / "d.safetensors", model)
    kohya, peft = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "d.safetensors")
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{stem}.lora_down.weight"].shape == (2, 64) and kohya[f"{stem}.alpha"].item() == 2.0
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert peft[key].shape == (2, 16)
    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 2.0


def test_bad_input_is_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"match no Linear/Conv2d module; candidate names end in: .*attnN.to_q") as e:
        add_lora(small_unet(), 4, 4.0, targets=(r".*\.to_qq",))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"rank 0 is outside"):
        add_lora(small_unet(), 0, 4.0)
    with pytest.raises(ValueError, match=r"rank 17 is outside 1..16 .*attn2.to_k"):
        add_lora(small_unet(), 17, 4.0)  # to_k maps context_dim 16 -> 64
    save_lora(tmp_path / "own.safetensors", trained())
    other = small_unet(model_channels=64)
    add_lora(other, 4, 8.0)
    with pytest.raises(ValueError, match=r"made for another architecture: '.*' has shape"):
        load_lora_file(tmp_path / "own.safetensors", other)
    with pytest.raises(ValueError, match=r"made for another architecture: \d+ missing keys"):
        load_lora(small_unet(attention_levels=(0, 1)), lora_state_dict(trained()))
    save_lora_kohya(tmp_path / "k.safetensors", trained())
    with pytest.raises(ValueError, match=r"made for another architecture: \d+ of its modules are not in this model"):
        load_lora_file(tmp_path / "k.safetensors", small_unet(attention_levels=(0,)))


def test_wrong_architecture_peft_file(tmp_path) -> None:
    sd = {"unet.down_blocks.5.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
          "unet.down_blocks.5.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2)}
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="made for another architecture"):
        load_lora_file(tmp_path / "x.safetensors", small_unet())


@pytest.mark.parametrize("save", [save_lora_diffusers, save_lora_kohya], ids=["peft", "kohya"])
def test_diffusers_loads_our_files_and_agrees(tmp_path, save, monkeypatch) -> None:
    """diffusers' own loader (StableDiffusionPipeline's LoRA mixin, via peft) on a converted base U-Net."""
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from ldmlab.convert.unet import diffusers_unet_config, unet_ldmlab_to_diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, (x, t, c) = trained(rank=3, alpha=5.0, targets=ALL_KINDS[:-1]), inputs()
    add_lora(ours, 2, 1.0, targets=ALL_KINDS[-1:])  # a second rank and alpha: PEFT's rank/alpha_pattern
    for name, lora in lora_modules(ours):
        if name.endswith("proj_in"):
            torch.nn.init.normal_(lora.B.weight, std=0.5)
    base = small_unet()
    cfg = {k: v for k, v in diffusers_unet_config(ours.config).items() if not k.startswith("_")}
    theirs = diffusers.UNet2DConditionModel(**cfg).eval()
    theirs.load_state_dict(unet_ldmlab_to_diffusers(base.state_dict(), ours.config))
    save(tmp_path / "lora.safetensors", ours)
    pipe = diffusers.StableDiffusionPipeline
    sd, alphas, meta = pipe.lora_state_dict(str(tmp_path / "lora.safetensors"), return_lora_metadata=True)
    pipe.load_lora_into_unet(sd, alphas, theirs, metadata=meta)
    with torch.no_grad():
        want, got, plain = ours(x, t, c), theirs(x, t, c).sample, base(x, t, c)
    assert (want - plain).abs().max() > 1e-2  # the adapters matter
    assert torch.allclose(got, want, atol=1e-5)


def tiny_text_encoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=8)
    return transformers.CLIPTextModel(config).eval()


@pytest.mark.parametrize("save", [save_lora_diffusers, save_lora_kohya], ids=["peft", "kohya"])
def test_unet_and_text_encoder_in_one_file(tmp_path, save, monkeypatch) -> None:
    """One pipeline file for both parts; diffusers' text-encoder loader agrees with ours."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet, encoder, tokens = trained(), tiny_text_encoder(), torch.tensor([[1, 5, 7, 2]])
    add_lora(encoder, 2, 4.0, targets=TEXT_ENCODER)
    torch.manual_seed(4)
    for _, lora in lora_modules(encoder):
        torch.nn.init.normal_(lora.B.weight, std=0.1)
    save(tmp_path / "both.safetensors", unet, encoder)
    keys = load_file(tmp_path / "both.safetensors")
    prefix = "lora_te_" if save is save_lora_kohya else "text_encoder."
    assert any(k.startswith(f"{prefix}text_model") and "self_attn" in k and "q_proj" in k for k in keys)
    fresh_unet, fresh_encoder = small_unet(), tiny_text_encoder()
    load_lora_file(tmp_path / "both.safetensors", fresh_unet)
    names = load_lora_file(tmp_path / "both.safetensors", fresh_encoder, component="text_encoder")
    assert len(names) == 2 * 4
    x, t, c = inputs()
    assert torch.equal(fresh_unet(x, t, c), unet(x, t, c))
    want = encoder(tokens).last_hidden_state
    assert torch.equal(fresh_encoder(tokens).last_hidden_state, want)
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    theirs, pipe = tiny_text_encoder(), diffusers.StableDiffusionPipeline
    sd, alphas, meta = pipe.lora_state_dict(str(tmp_path / "both.safetensors"), return_lora_metadata=True)
    pipe.load_lora_into_text_encoder(sd, alphas, theirs, metadata=meta)
    with torch.no_grad():
        got = theirs(tokens).last_hidden_state
    assert (want - tiny_text_encoder()(tokens).last_hidden_state).abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("save", [save_lora, save_lora_diffusers, save_lora_kohya])
def test_other_adapter_kinds_and_damaged_files_are_one_line(tmp_path, save) -> None:
    save(tmp_path / "a.safetensors", trained())
    sd = load_file(tmp_path / "a.safetensors")
    first = next(k for k in sorted(sd) if k.endswith(("A.weight", "lora_down.weight")))
    save_file({**sd, first.replace("weight", "dora_scale"): torch.ones(1)}, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match="is not plain LoRA"):
        load_lora_file(tmp_path / "dora.safetensors", small_unet())
    up = first.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace("A.weight", "B.weight")
    save_file({k: v for k, v in sd.items() if k != up}, tmp_path / "damaged.safetensors")
    with pytest.raises(ValueError, match="lacks its down .A. or up .B. weight"):
        load_lora_file(tmp_path / "damaged.safetensors", small_unet())


@pytest.mark.parametrize("scope", ["full"])  # speed=gpu compiles the whole LDM U-Net
def test_compiled_lora_unet_matches_eager_in_output_and_adapter_gradients(scope: str) -> None:
    """speed=gpu's compile scopes trace the adapters' forward hooks (aot_eager: the GPU path's graphs on the CPU)."""
    from ldmlab import accel

    eager, compiled = trained(), trained()
    torch._dynamo.reset()
    assert accel.compile_model(compiled, scope, backend="aot_eager") > 0
    x, t, c = inputs()
    outs = [m(x, t, c) for m in (eager, compiled)]
    assert torch.allclose(outs[1], outs[0], atol=1e-5)
    for out in outs:
        out.square().mean().backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys() and all(".lora." in n for n in grads[0])
    assert all(torch.allclose(grads[1][n], g, atol=1e-6) for n, g in grads[0].items())
