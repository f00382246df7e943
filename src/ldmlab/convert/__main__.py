"""Convert U-Net and VAE weights between the ldmlab, SD-original and diffusers layouts.

    python -m ldmlab.convert --from FORMAT --to FORMAT [--unet IN] [--vae IN] --out OUT [options]

Give --unet and/or --vae; each part is converted on its own. What IN and OUT are, per format:

    ldmlab     IN: `unet.safetensors` / `vae.safetensors` (our names, `config` in the metadata: what
               `export_weights` writes).  OUT: a directory; writes OUT/unet.safetensors, OUT/vae.safetensors.
    sd         IN: an SD-original checkpoint, `.safetensors` or `.ckpt` (read weights-only), holding
               `model.diffusion_model.*` and/or `first_stage_model.*`; pass the same file to --unet and --vae
               (a bare VAE file such as vae-ft-mse also works for --vae).  OUT: one `.safetensors` file with
               both parts; the ldmlab configs go into its metadata so converting it back is exact.
    diffusers  IN: model directories (`config.json` + `diffusion_pytorch_model.safetensors`), e.g.
               <pipeline>/unet and <pipeline>/vae.  OUT: a directory; writes OUT/unet/ and OUT/vae/, loadable
               offline with `UNet2DConditionModel.from_pretrained` / `AutoencoderKL.from_pretrained`.

An SD checkpoint does not store the U-Net's head layout, so --from sd reads it from the metadata ldmlab
wrote, or else uses --num-heads (SD1.x: 8, the default) or --head-dim (SD2.x: 64). Examples:

    # a Stable Diffusion 1.5 checkpoint -> diffusers directories (EMA U-Net weights)
    python -m ldmlab.convert --from sd --to diffusers --ema \\
        --unet v1-5-pruned.ckpt --vae v1-5-pruned.ckpt --out sd15-diffusers
    # an ldmlab training export -> one SD-original file for SD tooling
    python -m ldmlab.convert --from ldmlab --to sd \\
        --unet run/export/unet.safetensors --vae run/export/vae.safetensors --out model.safetensors
    # a diffusers pipeline's U-Net and VAE -> ldmlab files to fine-tune from
    python -m ldmlab.convert --from diffusers --to ldmlab --unet sd15/unet --vae sd15/vae --out weights
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from ldmlab.convert import checkpoint as ckpt
from ldmlab.convert import vae as vae_map
from ldmlab.convert.load import infer_vae_config, read_state_dict
from ldmlab.convert.unet import (
    diffusers_unet_config,
    infer_unet_config,
    ldmlab_unet_config,
    unet_diffusers_to_ldmlab,
    unet_ldmlab_to_diffusers,
)

FORMATS = ("ldmlab", "sd", "diffusers")
KINDS = ("unet", "vae")
VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
Part = tuple[dict[str, Tensor], dict[str, Any]]  # (state dict with ldmlab names, ldmlab constructor config)


# --unet and --vae usually name the same SD checkpoint: read it once
_read_file = functools.lru_cache(maxsize=1)(read_state_dict)


def _read_sd(path: Path, kind: str, args: argparse.Namespace) -> Part:
    """One part of an SD-original checkpoint; config from ldmlab metadata, else inferred from shapes."""
    raw, metadata = _read_file(path)
    unet, vae = ckpt.split_sd_checkpoint(raw, ema=args.ema)
    if kind == "vae" and not vae:  # a bare SD VAE file (e.g. vae-ft-mse): keys without the prefix
        vae = {k: v for k, v in raw.get("state_dict", raw).items() if k.startswith(VAE_KEYS)}
    sd = unet if kind == "unet" else vae
    if not sd:
        raise ValueError(
            f"{path} holds no {kind} weights ('{ckpt.SD_UNET_PREFIX}…' / '{ckpt.SD_VAE_PREFIX}…')"
        )
    if f"ldmlab.{kind}" in metadata:
        return sd, json.loads(metadata[f"ldmlab.{kind}"])
    if kind == "vae":
        return sd, infer_vae_config(sd)
    return sd, infer_unet_config(sd, args.num_heads, args.head_dim)


def _read_diffusers(path: Path, kind: str, args: argparse.Namespace) -> Part:
    """One diffusers model directory, mapped to ldmlab names."""
    sd, cfg = ckpt.read_diffusers_dir(path)
    if kind == "unet":
        config = ldmlab_unet_config(cfg)
        return unet_diffusers_to_ldmlab(sd, config), config
    return vae_map.diffusers_to_ldmlab(sd), ckpt.ldmlab_vae_config(cfg)


def _read_ldmlab(path: Path, kind: str, args: argparse.Namespace) -> Part:
    """One ldmlab safetensors export."""
    return ckpt.load_ldmlab(path, kind)


READERS: dict[str, Callable[[Path, str, argparse.Namespace], Part]] = {
    "ldmlab": _read_ldmlab,
    "sd": _read_sd,
    "diffusers": _read_diffusers,
}


def _write_sd(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """All parts into one SD-original `.safetensors` file, ldmlab configs in its metadata."""
    sd = ckpt.join_sd_checkpoint(
        parts["unet"][0] if "unet" in parts else None, parts["vae"][0] if "vae" in parts else None
    )
    metadata = {"format": "pt", **{f"ldmlab.{kind}": json.dumps(cfg) for kind, (_, cfg) in parts.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ckpt.standalone_tensors(sd), str(out), metadata=metadata)
    return [out]


def _write_diffusers(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """OUT/unet and OUT/vae as diffusers model directories."""
    paths = []
    if "unet" in parts:
        sd, cfg = parts["unet"]
        paths.append(
            ckpt.write_diffusers_dir(
                unet_ldmlab_to_diffusers(sd, cfg), diffusers_unet_config(cfg), out / "unet"
            )
        )
    if "vae" in parts:
        sd, cfg = parts["vae"]
        diff_cfg = ckpt.diffusers_vae_config(cfg, args.vae_scaling_factor)
        paths.append(ckpt.write_diffusers_dir(vae_map.ldmlab_to_diffusers(sd), diff_cfg, out / "vae"))
    return paths


def _write_ldmlab(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """OUT/unet.safetensors and OUT/vae.safetensors."""
    return [ckpt.save_ldmlab(sd, cfg, out / f"{kind}.safetensors", kind) for kind, (sd, cfg) in parts.items()]


WRITERS: dict[str, Callable[[dict[str, Part], Path, argparse.Namespace], list[Path]]] = {
    "ldmlab": _write_ldmlab,
    "sd": _write_sd,
    "diffusers": _write_diffusers,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m ldmlab.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="src", choices=FORMATS, required=True, help="layout of the inputs")
    p.add_argument("--to", dest="dst", choices=FORMATS, required=True, help="layout to write")
    p.add_argument("--unet", type=Path, help="U-Net input (file or directory, per --from)")
    p.add_argument("--vae", type=Path, help="VAE input (file or directory, per --from)")
    p.add_argument(
        "--out", type=Path, required=True, help="output directory (a .safetensors file for --to sd)"
    )
    p.add_argument("--ema", action="store_true", help="--from sd: take the U-Net's EMA weights (model_ema.*)")
    p.add_argument(
        "--num-heads", type=int, default=8, help="--from sd without ldmlab metadata: heads (SD1.x 8)"
    )
    p.add_argument("--head-dim", type=int, default=None, help="--from sd: head width instead (SD2.x 64)")
    p.add_argument(
        "--vae-scaling-factor",
        type=float,
        default=ckpt.SD_VAE_SCALING_FACTOR,
        help="--to diffusers: latent scale written into the VAE config (SD1.x 0.18215)",
    )
    args = p.parse_args(argv)
    if args.unet is None and args.vae is None:
        p.error("give --unet and/or --vae")
    if args.dst == "sd" and args.out.suffix != ".safetensors":
        p.error(f"--to sd writes one file: give --out ending in .safetensors, not '{args.out}'")
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the conversion; returns the paths written."""
    args = parse_args(argv)
    inputs = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    try:
        parts = {kind: READERS[args.src](path, kind, args) for kind, path in inputs.items()}
    finally:
        _read_file.cache_clear()  # a later call in the same process may read a rewritten file
    paths = WRITERS[args.dst](parts, args.out, args)
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # bad inputs: one line, no traceback
        sys.exit(f"python -m ldmlab.convert: error: {err}")
