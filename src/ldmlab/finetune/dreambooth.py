"""DreamBooth's two helpers (Ruiz et al. 2023, arXiv:2208.12242): rare identifiers from a tokenizer's vocabulary,
and the class images of prior preservation, drawn by the model before it is fine-tuned and kept as shards.

The paper's §4.1: the identifier should be a token the model has no strong prior for, "rare tokens in the
vocabulary" of at most 3 characters, not a made-up word spelled from common pieces ("xxy5syt00" tokenizes into
letters the model knows well). The class images x_pr = x̂(z, c_pr) from "a [class noun]" (§4.2, eq. 2) are drawn
once and reused, so they are written as WebDataset shards that the prior stream reads like any image data.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ldmlab.data.make_shards import FORMAT_VERSION, ShardSink
from ldmlab.data.shards import MANIFEST, scan_count

Draw = Callable[[int, int], Tensor]  # (first index, count) -> (count, 3, H, W) images in [-1, 1]


def rare_identifiers(tokenizer: Any, n: int = 10, seed: int = 0, id_range: tuple[float, float] = (0.1, 0.2),
                     max_chars: int = 3) -> list[str]:
    """`n` identifier candidates: whole-word vocabulary tokens of <= `max_chars` lowercase letters, one token
    each, from the rarer part of a BPE vocabulary (ids in `id_range` as fractions of its size; merges are made
    in order of frequency, so later ids are rarer), in a seeded order."""
    vocab = tokenizer.get_vocab()
    lo, hi = (int(f * len(vocab)) for f in id_range)
    words = sorted({t.removesuffix("</w>") for t, i in vocab.items() if lo <= i < hi and t.endswith("</w>")})
    words = [w for w in words if re.fullmatch(f"[a-z]{{2,{max_chars}}}", w)
             and len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    if not words:
        raise ValueError(f"no whole-word tokens of <= {max_chars} letters among this tokenizer's ids {lo}..{hi}: "
                         "widen id_range or give model.finetune.identifier yourself")
    random.Random(seed).shuffle(words)
    return words[:n]


def _manifest(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def class_images_ready(out: str | Path, prompt: str, n: int) -> bool:
    """Whether `out` already holds >= n class images of `prompt`; one line when it holds another prompt's."""
    manifest = _manifest(Path(out))
    if not manifest:
        return False
    if manifest.get("prompt") != prompt:
        raise ValueError(f"model.finetune.class_dir={out} holds class images of {manifest.get('prompt')!r}, not "
                         f"{prompt!r}: choose another class_dir or delete it")
    return manifest["splits"]["train"]["samples"] >= n


def _png_sample(key: str, image: Tensor, prompt: str) -> dict:
    """One shard sample: PNG bytes of an image in [-1, 1], its caption."""
    import io

    from PIL import Image

    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return {"__key__": key, "png": buf.getvalue(), "txt": prompt.encode()}


def write_class_images(out: str | Path, prompt: str, n: int, draw: Draw, batch_size: int = 8,
                       shard_size: int = 100) -> Path:
    """Shards `train-%06d.tar` of `n` images of `prompt` drawn by `draw`, then manifest.json (last: "complete").

    Resumable: each full shard is renamed into place when written, and a re-run (a killed prepare, a larger
    `n`) draws only the shards that are missing; `draw` is seeded by image index, so they are the same images.
    """
    out = Path(out)
    if class_images_ready(out, prompt, n):
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a larger n: the set is incomplete again
    counts = {}
    for first in range(0, n, shard_size):
        name, count = f"train-{first // shard_size:06d}.tar", min(shard_size, n - first)
        if (out / name).is_file() and scan_count(str(out / name)) == count:  # finished by an earlier attempt
            counts[name] = count
            continue
        tmp = out / f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sink = ShardSink(tmp, "train", None, None)
        for start in range(first, first + count, batch_size):
            images = draw(start, min(batch_size, first + count - start))
            for i, image in enumerate(images):
                sink.write(_png_sample(f"{start + i:07d}", image, prompt))
        sink.close()
        os.replace(tmp / "train-000000.tar", out / name)
        tmp.rmdir()
        counts[name] = count
    manifest = {"format": FORMAT_VERSION, "kind": "images", "source": "generated", "prompt": prompt,
                "splits": {"train": {"samples": n, "shards": len(counts)}}, "counts": counts, "skipped": 0}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m ldmlab.finetune.dreambooth TOKENIZER_DIR [N]`: print identifier candidates."""
    import sys

    from transformers import CLIPTokenizer

    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit("usage: python -m ldmlab.finetune.dreambooth <tokenizer dir (CLIP, save_pretrained)> [n]")
    tokenizer = CLIPTokenizer.from_pretrained(args[0])
    try:
        print(" ".join(rare_identifiers(tokenizer, int(args[1]) if len(args) > 1 else 10)))
    except ValueError as e:  # one line, not a traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
