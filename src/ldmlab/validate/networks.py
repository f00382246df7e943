"""Network shapes: the configured networks are built on the meta device, so their own constructors judge them.

A shape rule lives once, in the constructor that needs it (`ldmlab.nn`, STYLE 18); building on the meta device
allocates no memory and takes a fraction of a second even for SD1.5, so a config is checked by building it and
prefixing the constructor's one-line refusal with the config path. What no single constructor can see stays
here: the U-Net's channels vs the VAE's latents, and image or latent sizes vs the networks' downsampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch import nn

from ldmlab.data.buckets import parse_buckets
from ldmlab.diffusion.variance import FixedVariance
from ldmlab.nn.autoencoder import AutoencoderKL
from ldmlab.nn.noisy_classifier import NoisyClassifier
from ldmlab.nn.unet import UNetModel
from ldmlab.validate.fields import get, image_size, target
from ldmlab.validate.files import vae_file_config

# plain networks (STYLE 1), built here; LPIPS reads its backbone file when built (a files rule checks it instead)
NETWORKS, READS_FILES = "ldmlab.nn.", ("ldmlab.nn.lpips.",)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def meta_build(cfg: DictConfig, key: str) -> tuple[Any, list[str]]:
    """The network (or object) at config `key` built on the meta device, or None and the constructor's refusal as
    one line."""
    try:
        with torch.device("meta"):
            return hydra.utils.instantiate(get(cfg, key), _convert_="all"), []
    except MissingMandatoryValue:
        return None, []  # a `???` inside: missing_values names it
    except InstantiationException as error:
        cause = error.__cause__
        if not isinstance(cause, (ValueError, AssertionError, TypeError)):
            raise
        return None, [f"{key}: {_first_line(cause)}"]
    except OmegaConfBaseException as error:  # e.g. an interpolation to a node that was set to null
        return None, [f"{key}: {_first_line(error)}"]


def build_networks(cfg: DictConfig) -> tuple[dict[str, nn.Module], list[str]]:
    """Every `ldmlab.nn` network directly under `model`, built on the meta device; one line per refusal."""
    model = get(cfg, "model")
    if not isinstance(model, DictConfig):
        return {}, []
    built, problems = {}, []
    for name in model:
        key = f"model.{name}"
        node = get(cfg, key)
        kind = target(cfg, key)
        if (not isinstance(node, DictConfig) or not kind.startswith(NETWORKS) or kind.startswith(READS_FILES)
                or node.get("_partial_")):
            continue
        module, refused = meta_build(cfg, key)
        problems += refused
        if module is not None:
            built[key] = module
    return built, problems


# ---------------------------------------------------------------- across groups: sizes and latents


def size_problems(key: str, net: UNetModel | AutoencoderKL | NoisyClassifier, side: Any, what: str, fix: str) -> list[str]:
    """`side` (an image or latent side) divides by the network's downsampling factor."""
    factor = net.downsample_factor
    if not isinstance(side, int) or side % factor == 0:
        return []
    line = (f"{key}.channel_mult={list(net.channel_mult)} downsamples H and W by {factor}, but {what} is {side}, "
            f"not a multiple of {factor}: {fix}")
    return [line]


def file_vae(cfg: DictConfig) -> tuple[AutoencoderKL | None, list[str]]:
    """The VAE that model.vae.path names, built on the meta device from its stored or inferred architecture."""
    path = get(cfg, "model.vae.path")
    if not target(cfg, "model.vae").endswith("load_vae") or path is None or not Path(path).exists():
        return None, []  # absent: weight_problems names the file
    try:
        config = vae_file_config(Path(path))
    except Exception as error:  # noqa: BLE001  # unsafe or unreadable file: one line, before the run
        return None, [f"model.vae.path: {_first_line(error)}"]
    if config is None:
        return None, [(f"model.vae.path={path} holds no autoencoder weights: give a VAEModule .ckpt, an exported "
                      "vae.safetensors, an SD checkpoint or a diffusers AutoencoderKL directory")]
    try:
        with torch.device("meta"):
            return AutoencoderKL(**config), []
    except (ValueError, TypeError) as error:
        return None, [f"model.vae.path={path}: {_first_line(error)}"]


def latent_manifest(cfg: DictConfig) -> list[int] | None:
    """[C, h, w] of a latent cache (data=wds_latents data.root=...), from its manifest.json."""
    root = get(cfg, "data.root")
    if not target(cfg, "data.decoder").endswith("LatentDecoder") or root is None:
        return None
    manifest = Path(root) / "manifest.json"
    return json.loads(manifest.read_text()).get("latent_shape") if manifest.is_file() else None


def latent_buckets(cfg: DictConfig) -> list[list[int]] | None:
    """[[C, h, w], ...] of a bucketed latent cache's manifest.json, or None."""
    root = get(cfg, "data.root")
    manifest = Path(root) / "manifest.json" if root is not None else None
    if manifest is None or not target(cfg, "data.decoder").endswith("LatentDecoder") or not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("buckets")


def condition_channels(cfg: DictConfig, channels: int) -> tuple[int | None, list[str]]:
    """Input channels model.image_condition adds to `channels`-channel latents (its own rule: `channels()`);
    None and its one-line refusal when it does not build."""
    node = get(cfg, "model.image_condition")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return 0, []
    try:
        return hydra.utils.instantiate(node, _convert_="all").channels(channels), []
    except InstantiationException as error:
        line = _first_line(error.__cause__ or error)
        return None, [line if line.startswith("model.image_condition") else f"model.image_condition: {line}"]


def channel_problems(unet: UNetModel, channels: int | None, source: str, variance: FixedVariance | None,
                     extra: int | None = 0) -> list[str]:
    """in_channels = the latents' channels + an image condition's `extra` (when known), out_channels = the
    variance's outputs × the latents' channels (not judged when the variance or the condition was refused)."""
    if extra is None:  # the condition's own line says why
        return []
    in_channels, out_channels = unet.config["in_channels"], unet.config["out_channels"]
    if channels and in_channels != channels + extra:  # each refused side names both fixes
        want = {"in_channels": channels + extra, "out_channels": channels * (variance.outputs if variance else 1)}
        why = f" + {extra} of model.image_condition" if extra else ""
        fix = f"model.unet.in_channels={want['in_channels']} model.unet.out_channels={want['out_channels']}"
        return [f"model.unet.{key}={unet.config[key]} but {source} has {channels}-channel latents{why}: set {fix}"
                for key in want if unet.config[key] != want[key]]
    problem = variance.channels_problem(in_channels - extra, out_channels) if variance else None
    return [problem] if problem else []


def latent_problems(cfg: DictConfig, unet: UNetModel, vae: AutoencoderKL | None, source: str,
                    variance: FixedVariance | None = FixedVariance()) -> list[str]:  # noqa: B008  # stateless
    """The U-Net's in/out channels match the latents (+ an image condition's, and the variance; None: refused, not
    judged); the latent side divides by the U-Net's factor."""
    shape = latent_manifest(cfg)
    if shape:
        channels, source = shape[0], f"the latent cache data.root={get(cfg, 'data.root')}"
    else:
        channels = vae.embed_dim if vae is not None else None
    extra, problems = condition_channels(cfg, channels) if channels else (0, [])
    problems += channel_problems(unet, channels, source, variance, extra)
    fix = f"change the image size so the latent side is a multiple of {unet.downsample_factor}, or use fewer levels"
    if shape:
        sides = sorted({side for b in latent_buckets(cfg) or [shape] for side in b[-2:]})  # every bucket's h, w
        return problems + [line for side in sides for line in size_problems(
            "model.unet", unet, side, f"the cached latent side ({source})", fix)][:1]
    size, field = image_size(cfg)
    if vae is None or not isinstance(size, int):
        return problems
    if size % vae.downsample_factor:
        return [*problems, (f"{field}={size} is not a multiple of {vae.downsample_factor}, the downsampling factor "
                           f"of {source}: set {field} to a multiple of {vae.downsample_factor}")]
    what = f"the latent side ({field}={size} / VAE factor {vae.downsample_factor})"
    return problems + size_problems("model.unet", unet, size // vae.downsample_factor, what, fix)


def nearest_multiple(x: int, factor: int) -> int:
    """The multiple of `factor` nearest `x` (halves up, at least `factor`): the fix an error line suggests."""
    return factor * max(1, (x + factor // 2) // factor)


def bucket_problems(cfg: DictConfig, factor: int, what: str) -> list[str]:
    """Every bucket side of data.decoder.buckets (or its generating step) is a multiple of `factor`."""
    spec = get(cfg, "data.decoder.buckets")
    if spec is None or not target(cfg, "data.decoder").endswith("ImageDecoder"):
        return []
    if isinstance(spec, DictConfig):
        step = spec.get("step", 64)
        fix = nearest_multiple(step, factor)
        return [] if step % factor == 0 else [(f"data.decoder.buckets.step={step} is not a multiple of {factor} "
                                               f"({what}): set data.decoder.buckets.step={fix}")]
    try:
        sizes = parse_buckets(spec)
    except ValueError as error:
        return [str(error)]
    bad = [list(s) for s in sizes if s[0] % factor or s[1] % factor]
    fix = [nearest_multiple(x, factor) for x in bad[0]] if bad else None
    return [(f"data.decoder.buckets has {bad[0]}: not a multiple of {factor} ({what}): use sizes that are, "
             f"e.g. {fix}")] if bad else []


def total_factor(unet: UNetModel, vae: AutoencoderKL | None) -> tuple[int, str]:
    """(image side multiple, how it is made): the VAE's factor × the U-Net's 2^(levels−1)."""
    f = vae.downsample_factor if vae is not None else 1
    return f * unet.downsample_factor, (f"VAE factor {f} × U-Net factor {unet.downsample_factor} of "
                                        f"model.unet.channel_mult={list(unet.channel_mult)}")


def model_networks(cfg: DictConfig) -> tuple[UNetModel | None, AutoencoderKL | None, list[str]]:
    """The configured U-Net and VAE (built on the meta device) and the refusals met building them."""
    built, problems = build_networks(cfg)
    vae = built.get("model.vae")
    if vae is None and built.get("model.unet") is not None:
        vae, refused = file_vae(cfg)
        problems += refused
    return built.get("model.unet"), vae, problems


def configured_variance(cfg: DictConfig) -> tuple[FixedVariance | None, list[str]]:
    """The model/diffusion/variance object (fixed when unset, as in checkpoints from before it), or None and its
    refusal."""
    if get(cfg, "model.diffusion.variance") is None:
        return FixedVariance(), []
    return meta_build(cfg, "model.diffusion.variance")


def classifier_problems(cfg: DictConfig, classifier: NoisyClassifier) -> list[str]:
    """A noise-aware classifier's in_channels match the latents (cache or VAE); their side divides by its levels."""
    vae, problems = file_vae(cfg)
    shape = latent_manifest(cfg)
    channels, source = ((shape[0], f"the latent cache data.root={get(cfg, 'data.root')}") if shape else
                        (vae.embed_dim if vae is not None else None, f"the VAE at model.vae.path={get(cfg, 'model.vae.path')}"))
    if channels and classifier.config["in_channels"] != channels:
        problems.append(f"model.classifier.in_channels={classifier.config['in_channels']} but {source} has "
                        f"{channels}-channel latents: set model.classifier.in_channels={channels}")
    fix = "use fewer model.classifier.channel_mult levels, or latents whose side is a multiple"
    if shape:
        return problems + size_problems("model.classifier", classifier, shape[-1], f"the cached latent side ({source})",
                                        fix)
    size, field = image_size(cfg)
    if vae is None or not isinstance(size, int) or size % vae.downsample_factor:
        return problems
    what = f"the latent side ({field}={size} / VAE factor {vae.downsample_factor})"
    return problems + size_problems("model.classifier", classifier, size // vae.downsample_factor, what, fix)


def network_problems(cfg: DictConfig) -> list[str]:
    """Each configured network builds (its constructor's rules), and the networks fit the data and each other."""
    built, problems = build_networks(cfg)
    variance, refused = configured_variance(cfg)
    problems += refused
    if isinstance(classifier := built.get("model.classifier"), NoisyClassifier):  # a noise-aware classifier (classifier guidance)
        problems += classifier_problems(cfg, classifier)
    if (ae := built.get("model.autoencoder")) is not None:  # VAE training
        size, field = image_size(cfg)
        problems += size_problems("model.autoencoder", ae, size, field,
                                  f"set {field} to a multiple of {ae.downsample_factor}, or use fewer levels")
        problems += bucket_problems(cfg, ae.downsample_factor, "the downsampling of model.autoencoder")
    if (unet := built.get("model.unet")) is None:
        return problems
    vae, source = built.get("model.vae"), "model.vae"
    if vae is None:
        vae, refused = file_vae(cfg)
        problems += refused
        source = f"the VAE at model.vae.path={get(cfg, 'model.vae.path')}"
    if vae is not None:
        problems += bucket_problems(cfg, *total_factor(unet, vae)) + grid_size_problems(cfg, *total_factor(unet, vae))
    return problems + latent_problems(cfg, unet, vae, source, variance)


def grid_size_problems(cfg: DictConfig, factor: int, what: str) -> list[str]:
    """Every model.sampling.sizes entry is an (H, W) pair of multiples of the total downsampling `factor`."""
    sizes = get(cfg, "model.sampling.sizes") or []
    malformed = [list(s) for s in sizes if len(s) != 2]
    if malformed:
        return [f"model.sampling.sizes has {malformed[0]}: give [height, width] pairs, e.g. [[512, 768], [768, 512]]"]
    bad = [[int(h), int(w)] for h, w in sizes if int(h) % factor or int(w) % factor]
    return [(f"model.sampling.sizes has {bad[0]}: not a multiple of {factor} ({what}): use "
             f"{[nearest_multiple(x, factor) for x in bad[0]]}")] if bad else []
