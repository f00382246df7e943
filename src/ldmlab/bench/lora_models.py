"""The rows of bench.lora: variant names, the U-Nets they build (ours with add_lora, diffusers' with PEFT, full
fine-tuning), and the checks made before any timing: ours and PEFT train as many parameters in as many layers,
and a backward reaches exactly the trainable tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ldmlab.finetune.lora import add_lora
from ldmlab.nn.unet import UNetModel

FEATURES = frozenset({"cl", "compile", "ro", "cudnn_sdpa", "bf16base"})
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' names of add_lora's default targets

# a U-Net small enough for a CPU rehearsal whose layers still admit rank 64 (64 = its narrowest width and context)
TINY = {"model_channels": 64, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [0, 1],
        "num_heads": 4, "context_dim": 64}
CONTEXT_TOKENS = 77  # CLIP's sequence length
Forward = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Variant:
    """One row: which U-Net and adapters (`impl`, `rank`) and which speed features."""

    name: str
    impl: str  # full | ours | peft
    rank: int | None
    features: frozenset[str]

    @property
    def compiled(self) -> bool:
        return "compile" in self.features

    @property
    def peer_key(self) -> tuple[int | None, bool, bool]:
        """What an ours row and the PEFT rows it is compared with share: rank, compiled or not, frozen base dtype."""
        return self.rank, self.compiled, "bf16base" in self.features


def parse_variant(text: str) -> Variant:
    """`full[+f...]`, `ours:<rank>[+f...]` or `peft:<rank>[+f...]`; one line naming the valid forms otherwise."""
    head, *features = text.split("+")
    impl, _, rank = head.partition(":")
    ok = (impl == "full" and not rank) or (impl in ("ours", "peft") and rank.isdigit() and int(rank) > 0)
    ok = ok and set(features) <= FEATURES and ("ro" not in features or "compile" in features)
    if not ok or ("bf16base" in features and impl == "full"):
        raise ValueError(f"variant {text!r}: full | ours:<rank> | peft:<rank>, then +features from "
                         f"{sorted(FEATURES)} (ro needs compile; bf16base a rank)")
    return Variant(text, impl, int(rank) if rank else None, frozenset(features))


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """UNetModel's complete config (its defaults are SD1.5's) for the given overrides, built on the meta device."""
    with torch.device("meta"):
        return UNetModel(**config).config


def _peft_config(rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS)


def add_peft(model: nn.Module, rank: int) -> str:
    """Freeze diffusers' U-Net and inject PEFT's LoRA as train_text_to_image_lora.py does; returns the route taken
    (`add_adapter`, or peft's `inject_adapter_in_model` where this diffusers lacks it or refuses this peft)."""
    model.requires_grad_(False)
    add_adapter = getattr(model, "add_adapter", None)
    if add_adapter is not None:
        try:
            add_adapter(_peft_config(rank))
            return "add_adapter"
        except (ImportError, ValueError) as err:  # diffusers' peft version check
            print(f"  unet.add_adapter refused ({err}); using peft.inject_adapter_in_model", flush=True)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(_peft_config(rank), model)
    return "inject_adapter_in_model"


def _pretrained_like(model: nn.Module) -> None:
    """Fill the zero-initialised layers (proj_out, out_layers.3, the output conv) as a trained U-Net has them;
    otherwise no gradient reaches the attention adapters and the gradient check would prove nothing."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.is_meta and not p.any():
                p.normal_(std=0.02)


def build(variant: Variant, config: dict[str, Any], device: str) -> tuple[nn.Module, Forward, str]:
    """The variant's U-Net on `device`, frozen but for what it trains; its forward(model, x, t, context); a note."""
    torch.manual_seed(0)
    if variant.impl == "peft":
        return _build_peft(variant.rank or 0, config, device)
    with torch.device(device):
        model = UNetModel(**config)
    _pretrained_like(model)
    if variant.rank is not None:
        add_lora(model, variant.rank, float(variant.rank))  # conf/finetune/lora.yaml's default targets
    return model, lambda m, x, t, c: m(x, t, context=c), ""


def _build_peft(rank: int, config: dict[str, Any], device: str) -> tuple[nn.Module, Forward, str]:
    from diffusers import UNet2DConditionModel

    from ldmlab.convert.unet import diffusers_unet_config

    with torch.device(device):
        model = UNet2DConditionModel(**diffusers_unet_config(full_config(config)))
    _pretrained_like(model)
    route = add_peft(model, rank)
    return model, lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample, route


def cast_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Store the frozen weights in `dtype`, the adapters staying fp32: diffusers' LoRA script under bf16 mixed
    precision (`unet.to(dtype=weight_dtype)`, then the trainable tensors cast back to fp32)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def is_adapter(impl: str, name: str) -> bool:
    """Whether parameter `name` belongs to a LoRA adapter of `impl` (ours: `<layer>.lora.A|B`; PEFT: `lora_A|B`)."""
    return ".lora." in name if impl == "ours" else ".lora_A." in name or ".lora_B." in name


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def check_trainable(variant: Variant, model: nn.Module) -> None:
    """LoRA rows train adapter tensors alone, full fine-tuning trains every tensor."""
    names = trainable_names(model)
    if not names:
        raise RuntimeError(f"{variant.name}: no tensor trains")
    if variant.impl == "full":
        wrong = {n for n, _ in model.named_parameters()} - names  # frozen where all should train
    else:
        wrong = {n for n in names if not is_adapter(variant.impl, n)}  # base tensors that train
    if wrong:
        raise RuntimeError(f"{variant.name}: {len(wrong)} tensors train wrongly, e.g. {sorted(wrong)[:2]}")


def check_gradients(variant: Variant, model: nn.Module, fwd: Forward, x: Tensor, t: Tensor, c: Tensor) -> None:
    """One eager backward on one sample: exactly the trainable tensors receive a gradient (an adapter that is not
    in the forward path would receive none)."""
    with torch.autocast(x.device.type, torch.bfloat16):
        out = fwd(model, x[:1], t[:1], c[:1])
    out.float().square().mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want = trainable_names(model)
    if got != want:
        raise RuntimeError(f"{variant.name}: gradients reached {len(got - want)} frozen tensors "
                           f"(e.g. {sorted(got - want)[:1]}) and missed {len(want - got)} trainable ones "
                           f"(e.g. {sorted(want - got)[:1]})")


def adapter_counts(impl: str, config: dict[str, Any], rank: int) -> tuple[int, int]:
    """(trainable parameters, adapted layers) of `impl` at `rank`, built on the meta device (no memory, no time)."""
    model, _, _ = build(Variant(impl, impl, rank, frozenset()), config, "meta")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = sum(1 for n, _ in model.named_modules() if n.endswith((".lora", ".lora_A")))
    return params, layers


def check_parity(config: dict[str, Any], ranks: Sequence[int], peft: bool) -> dict[int, tuple[int, int]]:
    """{rank: (trainable parameters, adapted layers)} of our LoRA; raises if PEFT's differ at any rank."""
    counts = {}
    for rank in sorted(set(ranks)):
        counts[rank] = adapter_counts("ours", config, rank)
        theirs = adapter_counts("peft", config, rank) if peft else counts[rank]
        if theirs != counts[rank]:
            raise RuntimeError(f"rank {rank}: ours trains {counts[rank][0]} parameters in {counts[rank][1]} layers, "
                               f"PEFT {theirs[0]} in {theirs[1]}: the targets differ, the speeds would not compare")
    return counts


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True
