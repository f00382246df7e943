"""Convert U-Net and VAE weights between the ldmlab, SD-original and diffusers layouts.

    python -m ldmlab.convert --from FORMAT --to FORMAT [--unet IN] [--vae IN] --out OUT [options]
    python -m ldmlab.convert --from ldmlab --to diffusers --ckpt CKPT --out DIR [--ema] [--text-encoder DIR]

Give --unet and/or --vae; each part is converted on its own. Or give --ckpt, a train.py checkpoint of a text
model, for a complete StableDiffusionPipeline directory (convert/pipeline.py): model_index.json, unet/, vae/
(scaling_factor = the model's latent_scale), text_encoder/ and tokenizer/ (from model.conditioner.path, or
--text-encoder), scheduler/ (the training schedule, prediction type and sampler). What IN and OUT are, per format:

    ldmlab     IN: `unet.safetensors` / `vae.safetensors` (our names, `config` in the metadata: what
               `export_weights` writes), or an LDM training checkpoint `.ckpt` for both (--ema: its EMA
               U-Net).  OUT: a directory; writes OUT/unet.safetensors, OUT/vae.safetensors.
    sd         IN: an SD-original checkpoint, `.safetensors` or `.ckpt` (read weights-only), holding
               `model.diffusion_model.*` and/or `first_stage_model.*`; pass the same file to --unet and --vae
               (a bare VAE file such as vae-ft-mse also works for --vae).  OUT: one `.safetensors` file with
               both parts; the ldmlab configs go into its metadata so converting it back is exact.
    diffusers  IN: model directories (`config.json` + `diffusion_pytorch_model.safetensors`), e.g.
               <pipeline>/unet and <pipeline>/vae.  OUT: a directory; writes OUT/unet/ and OUT/vae/, loadable
               offline with `UNet2DConditionModel.from_pretrained` / `AutoencoderKL.from_pretrained`.

An SD checkpoint does not store the U-Net's head layout, so --from sd reads it from the metadata ldmlab
wrote, or else uses --num-heads (SD1.x: 8, the default) or --head-dim (SD2.x: 64).

diffusers configs carry a `sample_size` (the U-Net's latent side, the VAE's image side): it is the size the
model was trained at, read from the input (a training checkpoint's latent shape, a diffusers config, the
metadata ldmlab writes), else --unet-sample-size / --vae-sample-size, else SD1.x's 64 / 512 with a warning.
Examples:

    # a Stable Diffusion 1.5 checkpoint -> diffusers directories (EMA U-Net weights)
    python -m ldmlab.convert --from sd --to diffusers --ema \\
        --unet v1-5-pruned.ckpt --vae v1-5-pruned.ckpt --out sd15-diffusers
    # an ldmlab training export -> one SD-original file for SD tooling
    python -m ldmlab.convert --from ldmlab --to sd \\
        --unet run/export/unet.safetensors --vae run/export/vae.safetensors --out model.safetensors
    # an ldmlab text model's training checkpoint -> StableDiffusionPipeline.from_pretrained("sd-pipe")
    python -m ldmlab.convert --from ldmlab --to diffusers --ema --ckpt run/checkpoints/last.ckpt --out sd-pipe
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
from typing import Any, NamedTuple

from safetensors.torch import save_file
from torch import Tensor

from ldmlab.convert import checkpoint as ckpt
from ldmlab.convert import vae as vae_map
from ldmlab.convert.load import infer_vae_config, read_state_dict
from ldmlab.convert.pipeline import write_pipeline
from ldmlab.convert.unet import (
    diffusers_unet_config,
    infer_unet_config,
    ldmlab_unet_config,
    unet_diffusers_to_ldmlab,
    unet_ldmlab_to_diffusers,
    upgrade_unet_config,
)

FORMATS = ("ldmlab", "sd", "diffusers")
KINDS = ("unet", "vae")
VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
SD_SAMPLE_SIZE = {"unet": 64, "vae": 512}  # SD1.x at 512 px: diffusers' defaults


class Part(NamedTuple):
    """One model read from the input."""

    sd: dict[str, Tensor]  # ldmlab names
    config: dict[str, Any]  # ldmlab constructor arguments
    sample_size: int | None = None  # trained at: latent side (U-Net) or image side (VAE); None if unknown


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
    size = int(metadata[f"ldmlab.{kind}.sample_size"]) if f"ldmlab.{kind}.sample_size" in metadata else None
    if f"ldmlab.{kind}" in metadata:
        config = json.loads(metadata[f"ldmlab.{kind}"])
        return Part(sd, upgrade_unet_config(config) if kind == "unet" else config, size)
    if kind == "vae":
        return Part(sd, infer_vae_config(sd), size)
    return Part(sd, infer_unet_config(sd, args.num_heads, args.head_dim), size)


def _read_diffusers(path: Path, kind: str, args: argparse.Namespace) -> Part:
    """One diffusers model directory, mapped to ldmlab names."""
    sd, cfg = ckpt.read_diffusers_dir(path)
    if kind == "unet":
        config = ldmlab_unet_config(cfg)
        return Part(unet_diffusers_to_ldmlab(sd, config), config, cfg.get("sample_size"))
    return Part(vae_map.diffusers_to_ldmlab(sd), ckpt.ldmlab_vae_config(cfg), cfg.get("sample_size"))


def _read_ldmlab(path: Path, kind: str, args: argparse.Namespace) -> Part:
    """One ldmlab safetensors export, or one part of an LDM training checkpoint."""
    if path.suffix == ".ckpt":
        return Part(*ckpt.load_training_checkpoint(_read_file(path)[0], path, kind, ema=args.ema))
    return Part(*ckpt.load_ldmlab(path, kind), sample_size=ckpt.ldmlab_sample_size(path))


READERS: dict[str, Callable[[Path, str, argparse.Namespace], Part]] = {
    "ldmlab": _read_ldmlab,
    "sd": _read_sd,
    "diffusers": _read_diffusers,
}


def _write_sd(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """All parts into one SD-original `.safetensors` file, ldmlab configs in its metadata."""
    sd = ckpt.join_sd_checkpoint(
        parts["unet"].sd if "unet" in parts else None, parts["vae"].sd if "vae" in parts else None
    )
    metadata = {"format": "pt", **{f"ldmlab.{kind}": json.dumps(part.config) for kind, part in parts.items()}}
    metadata.update({f"ldmlab.{kind}.sample_size": str(part.sample_size) for kind, part in parts.items()
                     if part.sample_size is not None})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(ckpt.standalone_tensors(sd), str(out), metadata=metadata)
    return [out]


def _write_diffusers(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """OUT/unet and OUT/vae as diffusers model directories."""
    paths = []
    if "unet" in parts:
        sd, cfg, _ = parts["unet"]
        diff_cfg = diffusers_unet_config(cfg, _sample_size(parts, "unet", args))
        paths.append(ckpt.write_diffusers_dir(unet_ldmlab_to_diffusers(sd, cfg), diff_cfg, out / "unet"))
    if "vae" in parts:
        sd, cfg, _ = parts["vae"]
        diff_cfg = ckpt.diffusers_vae_config(cfg, args.vae_scaling_factor, _sample_size(parts, "vae", args))
        paths.append(ckpt.write_diffusers_dir(vae_map.ldmlab_to_diffusers(sd), diff_cfg, out / "vae"))
    return paths


def _sample_size(parts: dict[str, Part], kind: str, args: argparse.Namespace) -> int:
    """The size `kind` was trained at: from the command line, the input, or SD's default with a warning."""
    given = getattr(args, f"{kind}_sample_size") or parts[kind].sample_size
    if given is not None:
        return int(given)
    print(f"warning: --{kind} {getattr(args, kind)} does not record the size it was trained at: writing SD1.x's "
          f"sample_size {SD_SAMPLE_SIZE[kind]}; pass --{kind}-sample-size N", file=sys.stderr)
    return SD_SAMPLE_SIZE[kind]


def _write_ldmlab(parts: dict[str, Part], out: Path, args: argparse.Namespace) -> list[Path]:
    """OUT/unet.safetensors and OUT/vae.safetensors."""
    return [ckpt.save_ldmlab(sd, cfg, out / f"{kind}.safetensors", kind, size) for kind, (sd, cfg, size) in parts.items()]


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
    p.add_argument("--ckpt", type=Path, help="a train.py checkpoint of a text model: a whole diffusers pipeline")
    p.add_argument("--text-encoder", type=Path, help="--ckpt: the CLIP directory, if not model.conditioner.path")
    p.add_argument("--ema", action="store_true", help="take the U-Net's EMA weights (SD model_ema.*, ldmlab EMA)")
    p.add_argument(
        "--num-heads", type=int, default=8, help="--from sd without ldmlab metadata: heads (SD1.x 8)"
    )
    p.add_argument("--head-dim", type=int, default=None, help="--from sd: head width instead (SD2.x 64)")
    for kind, what in (("unet", "latent side, e.g. 64 for SD1.x"), ("vae", "image side, e.g. 512 for SD1.x")):
        p.add_argument(f"--{kind}-sample-size", type=int, default=None,
                       help=f"--to diffusers: the {kind}'s sample_size ({what}) when the input does not record it")
    p.add_argument(
        "--vae-scaling-factor",
        type=float,
        default=ckpt.SD_VAE_SCALING_FACTOR,
        help="--to diffusers: latent scale written into the VAE config (SD1.x 0.18215; --ckpt: the model's own)",
    )
    args = p.parse_args(argv)
    if args.ckpt is not None and (args.src, args.dst) != ("ldmlab", "diffusers"):
        p.error("--ckpt writes a diffusers pipeline from an ldmlab checkpoint: use --from ldmlab --to diffusers")
    if args.ckpt is not None and (args.unet or args.vae):
        p.error("give --ckpt alone (it holds the U-Net and the VAE), or --unet / --vae")
    if args.ckpt is None and args.unet is None and args.vae is None:
        p.error("give --unet and/or --vae, or --ckpt")
    if args.dst == "sd" and args.out.suffix != ".safetensors":
        p.error(f"--to sd writes one file: give --out ending in .safetensors, not '{args.out}'")
    return args


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the conversion; returns the paths written."""
    args = parse_args(argv)
    if args.ckpt is not None:
        paths = write_pipeline(args.ckpt, args.out, ema=args.ema, text_encoder=args.text_encoder)
        for path in paths:
            print(f"wrote {path}")
        return paths
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
