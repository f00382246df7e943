"""Files a run reads: data shards and directories, weights, and the resume checkpoint (weights-only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from ldmlab.validate.fields import get, target

# ckpt_path values Lightning resolves itself (no file to check here)
CKPT_ALIASES = {"last", "hpc", "best", "registry"}


def _exists(key: str, value: Any, what: str, check: Any = Path.exists) -> list[str]:
    """[] if `value` is unset or passes `check`, else "<key>=<value> not found: give <what>"."""
    return [] if value is None or check(Path(value)) else [f"{key}={value} not found: give {what}"]


def data_problems(cfg: DictConfig) -> list[str]:
    """data.root / data.train_urls / data.val_urls / data.source.src name files that exist."""
    data = get(cfg, "data")
    if not isinstance(data, DictConfig):
        return []
    root = data.get("root")
    problems = _exists("data.root", root, "the directory make_shards or cache_latents wrote", Path.is_dir)
    if root is not None and not problems and not (Path(root) / "manifest.json").is_file():
        problems.append(f"data.root={root} has no manifest.json: give a directory written by make_shards or "
                        "cache_latents, or name the shards with data.train_urls")
    if "train_urls" in data and data.train_urls is None and root is None:
        problems.append("data.train_urls and data.root are both null: set data.root=<make_shards output dir> "
                        "or data.train_urls='dir/train-{000000..000009}.tar'")
    if not target(cfg, "data.source"):  # a shard source (demo, folder) writes its shards later, by design
        problems += [line for key in ("train_urls", "val_urls") if data.get(key) is not None
                     for line in _url_problems(f"data.{key}", data[key])]
    source = data.get("source") or {}
    if "src" in source and source.src is None:
        problems.append("data.source.src is null: give an image folder or .jsonl manifest, e.g. "
                        "data.source.src=/data/img")
    elif "src" in source:
        problems += _exists("data.source.src", source.src, "an image folder (a subfolder per class) or a .jsonl")
    return problems


def _url_problems(key: str, urls: Any) -> list[str]:
    """Local shard patterns that expand to no files (remote and pipe: urls are left to the loader)."""
    from ldmlab.data.shards import expand_urls

    try:
        expand_urls(list(urls) if isinstance(urls, ListConfig) else urls)
    except FileNotFoundError as error:
        return [f"{key}: {error}"]
    return []


def weight_problems(cfg: DictConfig) -> list[str]:
    """Weight files the model reads at construction, and the resume checkpoint: present, and weights-only."""
    problems = []
    if target(cfg, "model.vae").endswith("load_vae"):
        problems += _exists("model.vae.path", get(cfg, "model.vae.path"), "a VAEModule .ckpt, an exported "
                            "vae.safetensors, an SD checkpoint or a diffusers AutoencoderKL directory")
    problems += checkpoint_problems("model.training.unet_init", get(cfg, "model.training.unet_init"),
                                    "an ldmlab unet.safetensors (python -m ldmlab.convert --to ldmlab ...), "
                                    "or model.training.unet_init=null")
    if target(cfg, "model.conditioner").endswith("TextConditioner"):
        problems += _exists("model.conditioner.path", get(cfg, "model.conditioner.path"),
                            "a directory with a save_pretrained CLIPTextModel and tokenizer",
                            lambda p: (p / "config.json").is_file())
    if (get(cfg, "model.loss.perceptual_weight") or 0) > 0 and get(cfg, "model.lpips.backbone") != "random":
        problems += checkpoint_problems("model.lpips.backbone", get(cfg, "model.lpips.backbone"),
                                        "torchvision's vgg16-397923af.pth, or set "
                                        "model.lpips.backbone=random or model.loss.perceptual_weight=0")
    return problems + checkpoint_problems("ckpt_path", get(cfg, "ckpt_path"))


def checkpoint_problems(key: str, path: Any, hint: str = "a checkpoint written by train.py, e.g. "
                        "outputs/<run>/checkpoints/last.ckpt") -> list[str]:
    """The file exists and, if a pickle, unpickles weights-only (memory-mapped: tensor data is not read)."""
    if path is None or str(path) in CKPT_ALIASES:
        return []
    if not Path(path).exists():
        return [f"{key}={path} not found: give {hint}"]
    # directories (sharded FSDP checkpoints, diffusers models) have their own loaders; safetensors hold
    # no code
    if Path(path).is_dir() or Path(path).suffix == ".safetensors":
        return []
    from ldmlab.nn.safe_load import UnsafeCheckpointError, load_weights_only

    try:
        load_weights_only(path, mmap=True)
    except UnsafeCheckpointError as error:
        return [f"{key}: {error}"]
    except Exception as error:  # noqa: BLE001  # a truncated or foreign file: say so in one line
        return [(f"{key}={path} is not a readable checkpoint ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]})")]
    return []




# ---------------------------------------------------------------- a VAE's architecture, read without its weights


def vae_file_config(path: Path) -> dict[str, Any] | None:
    """AutoencoderKL arguments of the VAE in a file or diffusers directory: stored by ldmlab, else read off the
    tensor shapes (headers and memory-mapped pickles only); None when it holds no autoencoder."""
    norm_groups = 32
    if path.is_dir():  # diffusers AutoencoderKL: config.json + diffusion_pytorch_model.safetensors
        conf_file, path = path / "config.json", path / "diffusion_pytorch_model.safetensors"
        if not conf_file.is_file() or not path.is_file():
            return None
        conf = json.loads(conf_file.read_text())
        if "_ldmlab_config" in conf:  # exact when ldmlab wrote the directory
            return conf["_ldmlab_config"]
        norm_groups = conf.get("norm_num_groups", norm_groups)
    config, shapes = _safetensors_header(path) if path.suffix == ".safetensors" else _pickle_header(path)
    return config or _config_from_shapes(shapes, norm_groups)


def _safetensors_header(path: Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """(ldmlab config from the metadata, tensor shapes) of a safetensors file: its header only."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") == "ldmlab.vae" and "config" in meta:
            return json.loads(meta["config"]), {}
        return None, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  # not iterable


def _pickle_header(path: Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, ...]]]:
    """(VAEModule checkpoint's autoencoder_config, tensor shapes): a weights-only, memory-mapped load."""
    from ldmlab.nn.safe_load import load_weights_only

    raw = load_weights_only(path, mmap=True)  # refuses pickled code; tensor data stays on disk
    if not isinstance(raw, dict):
        return None, {}
    if isinstance(raw.get("autoencoder_config"), dict):
        return raw["autoencoder_config"], {}
    return None, {k: tuple(v.shape) for k, v in raw.get("state_dict", raw).items() if hasattr(v, "shape")}


def _config_from_shapes(shapes: dict[str, tuple[int, ...]], norm_groups: int) -> dict[str, Any] | None:
    """convert.load's own inference (SD, ldmlab and diffusers names), run on meta tensors of these shapes."""
    import torch

    from ldmlab.convert.load import LIT_VAE_PREFIX, SD_VAE_PREFIX, infer_vae_config, strip_prefix
    from ldmlab.convert.vae import diffusers_to_ldmlab

    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    prefix = next((p for p in (LIT_VAE_PREFIX, SD_VAE_PREFIX) if any(k.startswith(p) for k in sd)), "")
    sd = strip_prefix(sd, prefix)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        sd = diffusers_to_ldmlab(sd)
    return infer_vae_config(sd, norm_groups) if "encoder.conv_in.weight" in sd else None
