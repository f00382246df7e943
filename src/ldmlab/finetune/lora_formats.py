"""LoRA files: ldmlab's own, diffusers/PEFT (`pipe.load_lora_weights`) and kohya/A1111 (ComfyUI, A1111), both ways.

Key formats (module names are diffusers', from convert/unet.py for our U-Net; a text encoder's are its own):
- PEFT/diffusers: `unet.<module>.lora_A.weight` (r, in[, kh, kw]), `unet.<module>.lora_B.weight` (out, r[, 1, 1]);
  alpha and rank in the safetensors metadata `lora_adapter_metadata`, a JSON of LoraConfig arguments prefixed
  with the component (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`, ...), as diffusers'
  `save_lora_weights(unet_lora_adapter_metadata=...)` writes it; without it diffusers takes alpha = r.
- kohya/A1111: `lora_unet_<module with . -> _>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`
  (`lora_te_` for the text encoder); a missing alpha means alpha = r.
Only the trained update is written: set_lora_scale's multiplier stays a load-time choice of the reader.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ldmlab.convert.unet import unet_module_ldmlab_to_diffusers
from ldmlab.finetune.lora import add_lora, load_lora, lora_modules, lora_state_dict

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te"}


def _external_name(model: nn.Module, name: str) -> str:
    """diffusers/kohya name of one of `model`'s modules: renamed for an ldmlab UNetModel, else its own."""
    config = getattr(model, "config", None)
    if isinstance(config, dict) and "num_res_blocks" in config:
        return unet_module_ldmlab_to_diffusers(name, config)
    if hasattr(model, "embeddings") and hasattr(model, "encoder") and not hasattr(model, "text_model"):
        return f"text_model.{name}"  # transformers 5 flattened CLIPTextModel; files keep the 4.x names
    return name


def _name_table(model: nn.Module) -> dict[str, str]:
    """diffusers name -> ldmlab name for every Linear / Conv2d of `model` (adapters excluded)."""
    table = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not re.search(r"(^|\.)lora\.[AB]$", name):
            try:
                table[_external_name(model, name)] = name
            except ValueError:
                continue
    return table


def _contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_lora(path: str | Path, model: nn.Module) -> None:
    """ldmlab's own adapter file: lora_state_dict(model) as safetensors."""
    save_file(_contiguous(lora_state_dict(model)), str(path))


def _components(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """The adapted networks to write, by diffusers component name; one line when there is none."""
    models = {k: m for k, m in (("unet", unet), ("text_encoder", text_encoder)) if m is not None}
    if not any(True for m in models.values() for _ in lora_modules(m)):
        raise ValueError("no LoRA adapters to export: call add_lora on the U-Net or text encoder first")
    return models


def _peft_config(model: nn.Module) -> dict:
    """LoraConfig arguments of `model`'s adapters: the commonest rank/alpha, the others as patterns."""
    # PEFT matches these names as suffixes: without 'text_model.' they fit transformers 4.x and 5 alike
    names = {n: _external_name(model, n).removeprefix("text_model.") for n, _ in lora_modules(model)}
    ranks = {names[n]: lora.rank for n, lora in lora_modules(model)}
    alphas = {names[n]: float(lora.alpha) for n, lora in lora_modules(model)}
    r, alpha = (Counter(d.values()).most_common(1)[0][0] for d in (ranks, alphas))
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
            "rank_pattern": {k: v for k, v in ranks.items() if v != r},
            "alpha_pattern": {k: v for k, v in alphas.items() if v != alpha}}


def save_lora_diffusers(path: str | Path, unet: nn.Module | None, text_encoder: nn.Module | None = None) -> None:
    """PEFT/diffusers LoRA safetensors that `pipe.load_lora_weights(path)` loads (U-Net and/or text encoder)."""
    sd, config = {}, {}
    for component, model in _components(unet, text_encoder).items():
        for name, lora in lora_modules(model):
            ext = f"{component}.{_external_name(model, name)}"
            sd[f"{ext}.lora_A.weight"], sd[f"{ext}.lora_B.weight"] = lora.A.weight, lora.B.weight
        if any(True for _ in lora_modules(model)):
            config.update({f"{component}.{k}": v for k, v in _peft_config(model).items()})
    meta = json.dumps(config, indent=2, sort_keys=True)
    save_file(_contiguous(sd), str(path), metadata={"format": "pt", METADATA_KEY: meta})


def save_lora_kohya(path: str | Path, unet: nn.Module | None, text_encoder: nn.Module | None = None) -> None:
    """kohya/A1111 LoRA safetensors (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`, `.alpha`)."""
    sd = {}
    for component, model in _components(unet, text_encoder).items():
        for name, lora in lora_modules(model):
            key = f"{KOHYA_PREFIX[component]}_{_external_name(model, name).replace('.', '_')}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = lora.A.weight, lora.B.weight
            sd[f"{key}.alpha"] = lora.alpha.float()
    save_file(_contiguous(sd), str(path), metadata={"ss_network_module": "networks.lora"})


def _from_diffusers(sd: dict[str, Tensor], meta: dict[str, str], component: str) -> dict[str, tuple]:
    """module -> (A, B, alpha) of a PEFT/diffusers file (alpha = r where the metadata has none)."""
    config = json.loads(meta.get(METADATA_KEY, "{}"))
    config = {k.removeprefix(f"{component}."): v for k, v in config.items() if k.startswith(f"{component}.")}
    out = {}
    for key, a in sd.items():
        if key.startswith(f"{component}.") and key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight").removeprefix(f"{component}.")
            # PEFT: alpha_pattern entry, else lora_alpha; diffusers without metadata: alpha = r
            pattern = config.get("alpha_pattern", {})
            alpha = pattern.get(module, pattern.get(module.removeprefix("text_model."),
                                                    config.get("lora_alpha", a.shape[0])))
            out[module] = (a, sd[key.replace(".lora_A.", ".lora_B.")], float(alpha))
    return out


def _from_kohya(sd: dict[str, Tensor], component: str, table: dict[str, str]) -> dict[str, tuple]:
    """module -> (A, B, alpha) of a kohya file; names resolved through the model's own modules."""
    flat = {f"{KOHYA_PREFIX[component]}_{ext.replace('.', '_')}": ext for ext in table}
    out = {}
    for key, a in sd.items():
        if key.startswith(f"{KOHYA_PREFIX[component]}_") and key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            alpha = sd.get(f"{stem}.alpha", torch.tensor(float(a.shape[0])))
            out[flat.get(stem, stem)] = (a, sd[f"{stem}.lora_up.weight"], float(alpha))
    return out


def _from_ldmlab(sd: dict[str, Tensor]) -> dict[str, tuple]:
    """module -> (A, B, alpha) of ldmlab's own file (save_lora)."""
    return {k.removesuffix(".lora.A.weight"): (a, sd[k.replace(".A.weight", ".B.weight")],
                                               float(sd.get(k.replace(".A.weight", ".alpha"), a.shape[0])))
            for k, a in sd.items() if k.endswith(".lora.A.weight")}


_PARTS = re.compile(r"^(.*?)\.(lora_A\.weight|lora\.A\.weight|lora_down\.weight|lora_B\.weight|lora\.B\.weight"
                    r"|lora_up\.weight|lora\.alpha|alpha)$")


def _check_plain(sd: dict[str, Tensor], prefix: str) -> None:
    """One line for keys of other adapter kinds (DoRA, LoHa, LoKr, biases) or a down/up weight without its pair."""
    parts: dict[str, set[str]] = {}
    for key in (k for k in sd if k.startswith(prefix)):
        match = _PARTS.match(key)
        if match is None:
            raise ValueError(f"LoRA file key '{key}' is not plain LoRA: DoRA, LoHa, LoKr and LoRA biases are "
                             "not supported")
        part = match.group(2).replace("_", ".").split(".")
        parts.setdefault(match.group(1), set()).add(part[-2] if part[-1] == "weight" else "alpha")
    for stem, kinds in parts.items():
        if len(kinds & {"A", "down"}) != 1 or len(kinds & {"B", "up"}) != 1:
            raise ValueError(f"LoRA file entry '{stem}' lacks its down (A) or up (B) weight: a damaged file")


def _read(path: str | Path, model: nn.Module, component: str) -> dict[str, tuple]:
    """ldmlab module name -> (A, B, alpha) of a file in any of the three formats."""
    with safe_open(str(path), "pt") as f:  # not a dict: iterate its keys()
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    if not any(".lora_A." in k or ".lora_down." in k for k in sd):
        _check_plain(sd, "")
        return _from_ldmlab(sd)
    table = _name_table(model)
    kohya = any(".lora_down." in k for k in sd)
    _check_plain(sd, f"{KOHYA_PREFIX[component]}_" if kohya else f"{component}.")
    modules = _from_kohya(sd, component, table) if kohya else _from_diffusers(sd, meta, component)
    if not modules:
        raise ValueError(f"LoRA file {Path(path).name} has no adapters for the {component} (its keys: "
                         f"{sorted(sd)[:2]}, ...)")
    unknown = sorted(set(modules) - set(table))
    if unknown:
        raise ValueError(f"LoRA file made for another architecture: {len(unknown)} of its modules are not in "
                         f"this model (e.g. '{unknown[0]}')")
    return {table[ext]: value for ext, value in modules.items()}


def lora_components(path: str | Path) -> set[str]:
    """Which networks a LoRA file adapts: {'unet'}, {'text_encoder'} or both (ldmlab's own files: {'unet'})."""
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    found = {c for c, kohya in KOHYA_PREFIX.items() for k in keys if k.startswith((f"{c}.", f"{kohya}_"))}
    return found or {"unet"}


def load_lora_file(path: str | Path, model: nn.Module, component: str = "unet") -> list[str]:
    """Load an ldmlab, PEFT/diffusers or kohya LoRA file into `model` (the file's `component`: 'unet' or
    'text_encoder'); adds the file's adapters (its ranks and alphas) where `model` has none."""
    modules = _read(path, model, component)
    if not any(True for _ in lora_modules(model)):
        known = dict(model.named_modules())
        unknown = sorted(set(modules) - set(known))
        if unknown:
            raise ValueError(f"LoRA file made for another architecture: {len(unknown)} of its modules are not "
                             f"in this model (e.g. '{unknown[0]}')")
        for name, (a, _, alpha) in modules.items():
            add_lora(model, a.shape[0], alpha, targets=[re.escape(name)])
    state = {}
    for name, (a, b, alpha) in modules.items():
        state.update({f"{name}.lora.A.weight": a, f"{name}.lora.B.weight": b, f"{name}.lora.alpha": torch.tensor(alpha)})
    load_lora(model, state)
    return list(modules)


__all__ = ["load_lora_file", "lora_components", "save_lora", "save_lora_diffusers", "save_lora_kohya"]
