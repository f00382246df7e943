"""Does each fine-tuning method learn? (issue 20) A CPU-size proof on the demo photographs, after `make demo`.

1. A text encoder and tokenizer are built here (CLIP architecture, random and frozen; one token per caption word)
   and a text-conditioned demo U-Net is pretrained with `train.py` on "a photo of <name>" crops of 9 photographs.
2. The 10th photograph ("flower") is taught from 5 crops by DreamBooth (with and without prior preservation),
   LoRA and Textual Inversion, each a `train.py` run from the pretrained U-Net.
3. The demo's classifier judge (trained on real crops of all 10 photos, never on samples) scores the share of
   "new prompt" samples it calls the new photograph, and the 9 old prompts' class accuracy (forgetting).

    python -m ldmlab.pipeline.finetune_demo [--demo outputs/pipeline/demo] [--out outputs/finetune_demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldmlab.configs import CONF_DIR
from ldmlab.data.demo import class_names
from ldmlab.pipeline import classifier as clf
from ldmlab.pipeline.stages import load_classifier
from ldmlab.sample import load_ldm
from ldmlab.utils.images import labelled_grid

HELD = 9  # 'flower': the photograph the pretrained model never saw
IDENTIFIER, CLASS_NOUN, TOKEN = "sks", "photo", "<new>"
REPO = CONF_DIR.parents[2] if (CONF_DIR.parents[2] / "train.py").is_file() else Path.cwd()


def caption(name: str) -> str:
    return f"a photo of {name.replace('_', ' ')}"  # CLIP's pre-tokenizer splits words at '_' anyway


def build_text_encoder(out: Path, words: list[str], width: int = 64, max_length: int = 8) -> Path:
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
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=max_length,
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


def write_folder(out: Path, pixels: torch.Tensor, captions: list[str]) -> Path:
    """PNG crops with same-name .txt captions: a data=folder source."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(zip(pixels, captions)):
        Image.fromarray(image.numpy()).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(text)
    return out


def train(args: list[str], run: Path, log: Path) -> Path:
    """`python train.py <args>` into `run`; returns its last.ckpt (skipped when a finished one is there)."""
    last = run / "checkpoints" / "last.ckpt"
    if (run / "export").is_dir() and last.is_file():
        return last
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run}"]
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return last


@torch.no_grad()
def draw(ckpt: Path, prompts: list[str], guidance: float, steps: int, seed: int = 0) -> torch.Tensor:
    module = load_ldm(ckpt, use_ema=True)
    sampler = partial(module.sampler, num_steps=steps)
    return torch.cat([module.sample(prompts[i:i + 96], len(prompts[i:i + 96]), guidance, seed=seed + i,
                                    sampler=sampler) for i in range(0, len(prompts), 96)])


def judge(ckpt: Path, new_prompt: str, names: list[str], judge_model: torch.nn.Module, opts: argparse.Namespace
          ) -> tuple[dict, torch.Tensor]:
    """Share of `new_prompt` samples judged as the held-out photo, and the old prompts' class accuracy."""
    new = draw(ckpt, [new_prompt] * opts.n_new, opts.guidance, opts.sample_steps)
    old_labels = [c for c in range(len(names)) if c != HELD for _ in range(opts.n_old)]
    old = draw(ckpt, [caption(names[c]) for c in old_labels], opts.guidance, opts.sample_steps, seed=10_000)
    new_pred = clf.predict(judge_model, new)
    old_pred = clf.predict(judge_model, old)
    return {"prompt": new_prompt, "new_share": float((new_pred == HELD).float().mean()),
            "old_accuracy": float((old_pred == torch.tensor(old_labels)).float().mean())}, new


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=REPO / "outputs/pipeline/demo")
    p.add_argument("--out", type=Path, default=REPO / "outputs/finetune_demo")
    p.add_argument("--docs", type=Path, default=REPO / "docs/finetune/demo_cpu")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--n-new", type=int, default=64)
    p.add_argument("--n-old", type=int, default=16)
    opts = p.parse_args(argv)
    vae, judge_path = opts.demo / "vae/export/vae.safetensors", opts.demo / "classifier/classifier.safetensors"
    if not (vae.is_file() and judge_path.is_file()):
        sys.exit(f"{opts.demo} lacks vae/export/vae.safetensors or classifier/classifier.safetensors: run make demo")
    started, out, names = time.time(), opts.out, class_names()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.log"
    pixels, labels = demo_train_crops()
    clip = build_text_encoder(out / "clip", sorted({w for n in names for w in caption(n).split()} | {IDENTIFIER}))
    old = labels != HELD
    pretrain_dir = write_folder(out / "pretrain_data", pixels[old], [caption(names[c]) for c in labels[old]])
    instance = pixels[labels == HELD][:5]
    db_dir = write_folder(out / "instance", instance, [f"a {IDENTIFIER} {CLASS_NOUN}"] * 5)
    ti_dir = write_folder(out / "instance_ti", instance, [caption(TOKEN)] * 5)
    text = ["model=unet_demo", f"model.vae.path={vae}", "model.conditioner._target_=ldmlab.lit.conditioning.TextConditioner",
            "~model.conditioner.num_classes", f"+model.conditioner.path={clip}", "+model.conditioner.max_length=8",
            "model.unet.context_dim=64", "model.unet.num_classes=null", "trainer=cpu", "callbacks.image_grids=null",
            "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=0", "seed=0"]
    base = train([*text, "data=folder", f"data.source.src={pretrain_dir}", "data.decoder.image_size=32",
                  "data.source.val_fraction=0", "data.batch_size=64", "data.num_workers=1",
                  f"trainer.max_steps={opts.pretrain_steps}"], out / "pretrain", log)
    init = [*text, f"model.unet_init={out / 'pretrain/export/unet.safetensors'}", f"trainer.max_steps={opts.steps}"]
    folder = ["data=folder", "data.decoder.image_size=32", "data.source.val_fraction=0", "data.batch_size=8",
              "data.num_workers=0", "data.samples_per_epoch=400"]
    booth = ["finetune=dreambooth", "data=dreambooth", f"data.instance.source.src={db_dir}",
             "data.instance.decoder.image_size=32", "data.instance.batch_size=8", "data.instance.num_workers=0",
             f"model.finetune.identifier={IDENTIFIER}", f"model.finetune.class_noun={CLASS_NOUN}",
             "model.finetune.num_class_images=200", f"model.finetune.class_dir={out / 'class_images'}",
             f"model.finetune.guidance={opts.guidance}", "model.finetune.batch_size=100", "optimizer.lr=1e-4"]
    runs = {
        "dreambooth": (booth, f"a {IDENTIFIER} {CLASS_NOUN}"),
        "dreambooth_no_prior": ([*booth, "model.finetune.prior_weight=0"], f"a {IDENTIFIER} {CLASS_NOUN}"),
        "lora": (["finetune=lora", *folder, f"data.source.src={db_dir}", "model.finetune.rank=8",
                  "optimizer.lr=1e-3"], f"a {IDENTIFIER} {CLASS_NOUN}"),
        "textual_inversion": (["finetune=textual_inversion", *folder, f"data.source.src={ti_dir}",
                               f'model.finetune.token="{TOKEN}"', f"model.finetune.init_word={CLASS_NOUN}",
                               "optimizer.lr=5e-3"], caption(TOKEN)),
    }
    judge_model = load_classifier(judge_path, torch.device("cpu"))
    results, grids = {}, {}
    results["pretrained"], grids["pretrained"] = judge(base, f"a {IDENTIFIER} {CLASS_NOUN}", names, judge_model, opts)
    for name, (args, prompt) in runs.items():
        ckpt = train([*init, *args], out / name, log)
        results[name], grids[name] = judge(ckpt, prompt, names, judge_model, opts)
        print(f"{name}: {results[name]}", flush=True)
    return write_docs(opts, results, grids, instance, time.time() - started)


def demo_train_crops() -> tuple[torch.Tensor, torch.Tensor]:
    """The demo's training crops, (N, 32, 32, 3) uint8 and labels, from its shards under data/."""
    import hydra
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=demo", f"paths.data_dir={REPO / 'data'}"])
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    return clf.load_split(dm, "train")


def write_docs(opts: argparse.Namespace, results: dict, grids: dict, instance: torch.Tensor, seconds: float) -> dict:
    """results.json, samples.png (8 new-prompt samples per model, the 5 training crops on top) and README.md."""
    docs = opts.docs
    docs.mkdir(parents=True, exist_ok=True)
    real = instance.permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = [torch.cat([real, real[:3]])] + [g[:8] for g in grids.values()]
    labelled_grid(torch.cat(rows), ["training crops", *grids], 8, 3).save(docs / "samples.png")
    meta = {k: v for k, v in vars(opts).items() if k not in ("demo", "out", "docs")}
    (docs / "results.json").write_text(json.dumps({"settings": meta, "results": results,
                                                   "minutes": seconds / 60}, indent=1))
    table = ["| model | prompt | judged as the new photo | old prompts' class accuracy |", "|---|---|---|---|"]
    table += [f"| {k} | `{v['prompt']}` | {v['new_share']:.1%} | {v['old_accuracy']:.1%} |" for k, v in results.items()]
    (docs / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return results


if __name__ == "__main__":
    main()
