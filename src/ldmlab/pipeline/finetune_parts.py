"""The fine-tuning proof's own stages (ldmlab.pipeline.finetune_demo): the text encoder built here, the data
folders cut from the VAE stage's crops, the judging of one model's samples, and the docs (table and grids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldmlab.pipeline import classifier as clf
from ldmlab.pipeline.stages import device_of, generate, load_classifier
from ldmlab.sample import load_ldm
from ldmlab.utils.images import labelled_grid

GRID_COLUMNS = 8  # new-prompt samples per model in samples.png
OLD_SEED = 10_000  # the old prompts' samples are seeded apart from the new prompt's


def caption(name: str) -> str:
    """The pretraining caption of a photograph: "a photo of <name>"."""
    return f"a photo of {name.replace('_', ' ')}"  # CLIP's pre-tokenizer splits words at '_' anyway


# ---------------------------------------------------------------- text encoder


def build_text_encoder(out: Path, words: list[str], width: int = 64, max_length: int = 8, layers: int = 2,
                       heads: int = 4) -> Path:
    """A random CLIPTextModel and a BPE tokenizer whose merges spell every word of `words` as one token."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<|startoftext|>", "<|endoftext|>"]
    letters = sorted({c for w in words for c in w[:-1]} | {w[-1] + "</w>" for w in words})
    merges: list[str] = []
    while True:  # BPE applies the lowest-ranked merge first: add one for the first pair of an unfinished word
        tokenizer = _tokenizer(out, specials + letters + _merged(merges), merges)
        pieces = next((t for w in words if len(t := tokenizer.tokenize(w)) > 1), None)
        if pieces is None:
            break
        merges.append(f"{pieces[0]} {pieces[1]}")
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=max_length,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2)
    CLIPTextModel(config).save_pretrained(str(out))
    return out


def _merged(merges: list[str]) -> list[str]:
    return list(dict.fromkeys(m.replace(" ", "") for m in merges))


def _tokenizer(out: Path, vocab: list[str], merges: list[str]) -> Any:
    """A CLIPTokenizer over `vocab` and `merges`, saved in `out`."""
    from transformers import CLIPTokenizer

    vocab = list(dict.fromkeys(vocab))
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), unk_token="<unk>",
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(out))
    return tokenizer


def text_encoder_stage(cfg: DictConfig, names: list[str], out: Path) -> dict:
    """The encoder and tokenizer of every caption word, the identifier and the class noun, in `out`."""
    words = vocabulary(cfg, names)
    t = cfg.text_encoder
    build_text_encoder(out, words, width=t.width, max_length=t.max_length, layers=t.layers, heads=t.heads)
    return {"words": words, "params": sum(p.numel() for p in _clip_params(out))}


def vocabulary(cfg: DictConfig, names: list[str]) -> list[str]:
    """The words the tokenizer spells as one token each."""
    return sorted({w for n in names for w in caption(n).split()} | {str(cfg.identifier), str(cfg.class_noun)})


def _clip_params(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(path / "model.safetensors")).values())


# ---------------------------------------------------------------- data


def write_folder(out: Path, pixels: torch.Tensor, captions: list[str]) -> Path:
    """PNG crops with same-name .txt captions: a data=folder source."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(zip(pixels, captions, strict=True)):
        Image.fromarray(image.numpy()).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(text)
    return out


def first_per_class(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """A mask of the first `per_class` items of each label (all when None)."""
    if per_class is None:
        return torch.ones_like(labels, dtype=torch.bool)
    seen: dict[int, int] = {}
    keep = []
    for label in labels.tolist():
        seen[label] = seen.get(label, 0) + 1
        keep.append(seen[label] <= per_class)
    return torch.tensor(keep)


def data_stage(cfg: DictConfig, vae_data: DictConfig, names: list[str], out: Path) -> dict:
    """From the VAE stage's training crops: pretrain/ (every photo but the held-out one, captioned), instance/
    and instance_ti/ (the held-out photo's first crops, captioned with the DreamBooth / Textual Inversion prompt)."""
    dm = hydra.utils.instantiate(vae_data)
    dm.prepare_data()
    pixels, labels = clf.load_split(dm, "train")
    held = names.index(str(cfg.held_out))
    keep = (labels != held) & first_per_class(labels, cfg.pretrain.per_class)
    write_folder(out / "pretrain", pixels[keep], [caption(names[c]) for c in labels[keep].tolist()])
    instance = pixels[labels == held][: int(cfg.instance_crops)]
    write_folder(out / "instance", instance, [str(cfg.prompt)] * len(instance))
    write_folder(out / "instance_ti", instance, [str(cfg.ti_prompt)] * len(instance))
    return {"pretrain_images": int(keep.sum()), "instance_images": len(instance), "image_size": pixels.shape[1]}


def instance_images(folder: Path) -> torch.Tensor:
    """The instance crops back from their folder: (N, 3, H, W) in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- judging


def judge_stage(cfg: DictConfig, ckpt: Path, prompt: str, names: list[str], judge_path: Path, trainer: DictConfig,
                out: Path) -> dict:
    """Samples of `prompt` and of each old prompt from `ckpt` (EMA weights), named by the judge: the share called
    the held-out photo, and the old prompts' class accuracy (forgetting). Keeps a few samples for the grids."""
    j, held = cfg.judge, names.index(str(cfg.held_out))
    device, precision = device_of(trainer), str(trainer.precision)
    module = load_ldm(ckpt, use_ema=True).to(device)
    judge = load_classifier(judge_path, device)
    new = generate(module, [prompt] * j.n_new, j.guidance, j.steps, j.batch_size, 0, precision)
    old_labels = [c for c in range(len(names)) if c != held for _ in range(j.n_old)]
    old = generate(module, [caption(names[c]) for c in old_labels], j.guidance, j.steps, j.batch_size, OLD_SEED,
                   precision)
    new_pred = clf.predict(judge, new, precision=precision)
    old_acc = clf.class_accuracy(clf.predict(judge, old, precision=precision), torch.tensor(old_labels), len(names))
    torch.save({"new": new[:GRID_COLUMNS].clone(), "old": old[:: j.n_old].clone()}, out / "samples.pt")
    return {"prompt": prompt, "new_share": float((new_pred == held).float().mean()),
            "old_accuracy": old_acc["accuracy"], "old_per_class": old_acc["per_class"],
            "new_called": torch.bincount(new_pred, minlength=len(names)).tolist()}


# ---------------------------------------------------------------- docs


def write_docs(cfg: DictConfig, r: dict, models: list[str], root: Path) -> list[str]:
    """results.json, table.md, samples.png (the training crops, then 8 new-prompt samples per model) and
    old_prompts.png (one sample of each old prompt per model) in `cfg.docs`; returns the table's lines."""
    docs = Path(cfg.docs)
    docs.mkdir(parents=True, exist_ok=True)
    samples = {m: torch.load(root / f"judge_{m}" / "samples.pt", weights_only=True) for m in models}
    zoom, columns = max(1, 96 // int(r["data"]["image_size"])), len(samples[models[0]]["new"])
    real = instance_images(root / "data" / "instance")
    real = real.repeat((columns + len(real) - 1) // len(real), 1, 1, 1)[:columns]  # repeated to fill the row
    rows = torch.cat([real, *(s["new"] for s in samples.values())])
    labelled_grid(rows, ["training crops", *models], columns, zoom).save(docs / "samples.png")
    old = torch.cat([s["old"] for s in samples.values()])
    labelled_grid(old, models, len(old) // len(models), zoom).save(docs / "old_prompts.png")
    table = table_lines(r, models)
    (docs / "table.md").write_text("\n".join(table) + "\n")
    keep = ("held_out", "instance_crops", "prompt", "ti_prompt", "image_size", "unet", "text_encoder", "pretrain",
            "tune", "judge", "vae", "classifier")
    settings = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v := cfg[k]) else v for k in keep}
    (docs / "results.json").write_text(json.dumps({"settings": settings, "results": r}, indent=1) + "\n")
    return table


def table_lines(r: dict, models: list[str]) -> list[str]:
    """The Markdown table: one row per model (pretrained first)."""
    lines = ["| model | prompt | judged as the new photo | old prompts' class accuracy | training s |",
             "|---|---|---|---|---|"]
    for m in models:
        j, trained = r[f"judge_{m}"], r["pretrain" if m == "pretrained" else m]
        lines.append(f"| {m} | `{j['prompt']}` | {j['new_share']:.1%} | {j['old_accuracy']:.1%} | "
                     f"{trained['seconds']:.0f} |")
    return lines
