"""The pipeline's stages. Each runs in its own dir under the pipeline dir and returns a JSON-able result.

vae, ldm     `ldmlab.run.train` on `conf/train.yaml` composed with the stage's overrides: a normal run dir
latents      `ldmlab.cache_latents` on the VAE stage's data config
classifier   SmallCNN on the real train crops; accuracy on held-out crops and on their VAE reconstructions
samples      one-row-per-class grids at each guidance scale, classified by the classifier

Devices come from the trainer configs (`trainer.accelerator`, `trainer.precision`), never assumed.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldmlab.cache_latents import CacheArgs, cache_latents
from ldmlab.checkpointing import newest_checkpoint
from ldmlab.convert.load import load_vae
from ldmlab.data.shards import count_samples, read_manifest
from ldmlab.data.transforms import normalize
from ldmlab.nn.classifier import SmallCNN
from ldmlab.pipeline import classifier as clf
from ldmlab.pipeline.domain import domain_scores
from ldmlab.pipeline.report import loss_curve_png, mean_of_last, read_series
from ldmlab.run import train
from ldmlab.sample import load_ldm
from ldmlab.utils.images import labelled_grid

log = logging.getLogger("ldmlab.pipeline")


def compose_stage(pipe: DictConfig, out: Path, overrides: list[str]) -> DictConfig:
    """conf/train.yaml + the stage's overrides (as `python train.py ...`), writing into `out`."""
    cfg = hydra.compose("train", overrides=list(overrides))
    with open_dict(cfg):
        for key in ("root_dir", "data_dir", "weights_dir"):  # the pipeline's paths.* hold for every stage
            cfg.paths[key] = pipe.paths[key]
        cfg.paths.output_dir = str(out)  # no @hydra.main per stage: no hydra:runtime.output_dir
    return cfg


def device_of(trainer: DictConfig) -> torch.device:
    """The device a trainer config trains on: cuda for gpu/cuda (or auto with a GPU present), else cpu."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def describe_device(trainer: DictConfig) -> str:
    """`cpu (32-true, 2 threads)` or `cuda: NVIDIA H100 80GB HBM3 (bf16-mixed)`, for the report."""
    device = device_of(trainer)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name()} ({trainer.precision})"
    return f"cpu ({trainer.precision}, {torch.get_num_threads()} threads)"


def _relative(path: Path | None, root: Path) -> str | None:
    return None if path is None else str(path.relative_to(root))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- training stages


def run_training(cfg: DictConfig, out: Path, overrides: list[str]) -> None:
    """Fit `cfg` into `out`. A run dir holding checkpoints (an interrupted earlier attempt) continues from the
    newest one: train()'s resume=auto, with metrics.csv continued by the CSV logger."""
    if (newest := newest_checkpoint(out, out / "checkpoints")) is not None:  # the one train() picks
        log.info("continuing %s from %s", out.name, newest)
    (out / ".hydra").mkdir(parents=True, exist_ok=True)  # what @hydra.main writes: compare.py and users read it
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), out / ".hydra" / "overrides.yaml")
    train(cfg)


def vae_stage(cfg: DictConfig, out: Path, overrides: list[str]) -> dict:
    """Train the VAE; result: f, latent shape, val PSNR/SSIM at the last validation, data sizes, class names."""
    run_training(cfg, out, overrides)
    vae = load_vae(out / "export" / "vae.safetensors")
    dm = hydra.utils.instantiate(cfg.data)
    size, f = int(dm.decoder.image_size), vae.downsample_factor
    series = read_series(out)
    grids = sorted((out / "images").glob("reconstructions_step*.png"))
    return {"f": f, "latent_shape": [vae.embed_dim, size // f, size // f], "image_size": size,
            "params": _params(vae), "val_psnr": series["val/psnr"][-1][1], "val_ssim": series["val/ssim"][-1][1],
            "steps": int(cfg.trainer.max_steps), "batch_size": int(dm.stream.batch_size),
            "train_samples": count_samples([u for s in dm.train_sources() for u in s]),
            "val_samples": count_samples(dm.val_url_list()), "class_names": list(dm.class_names),
            "reconstructions": _relative(grids[-1] if grids else None, out.parent)}


def ldm_stage(cfg: DictConfig, out: Path, overrides: list[str]) -> dict:
    """Train the class-conditional LDM on the cached latents; result: losses, loss-curve PNG, sizes."""
    run_training(cfg, out, overrides)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    series = read_series(out)
    curve = loss_curve_png(series, out.parent / "ldm_loss.png")
    unet_params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith("unet."))
    return {"steps": int(ckpt["global_step"]), "batch_size": int(cfg.data.batch_size), "params": unet_params,
            "p_uncond": float(cfg.model.training.p_uncond), "train_loss": mean_of_last(series, "train/loss"),
            "val_loss": series["val/loss"][-1][1], "latent_scale": float(ckpt["state_dict"]["latent_scale"]),
            "loss_curve": _relative(curve, out.parent), "device": describe_device(cfg.trainer)}


# ---------------------------------------------------------------- latent cache


def latents_stage(pipe: DictConfig, vae_cfg: DictConfig, out: Path, vae_path: Path) -> dict:
    """`ldmlab.cache_latents` of the VAE stage's data (train + val) into `out` (resumable by itself)."""
    cfg = vae_cfg.copy()
    with open_dict(cfg):
        cfg.trainer.precision = "32-true"  # encoded once, trained on for long: full precision (cache_latents)
    args = CacheArgs(vae=str(vae_path), out=str(out), batch_size=pipe.latents.batch_size,
                     num_workers=pipe.latents.num_workers)
    cache_latents(args, cfg)
    manifest = read_manifest(str(out / "manifest.json"))
    return {"dir": out.name, "latent_shape": manifest["latent_shape"], "buckets": manifest.get("buckets"),
            "train_samples": manifest["splits"]["train"]["samples"],
            "val_samples": manifest["splits"]["val"]["samples"]}


# ---------------------------------------------------------------- classifier


def classifier_stage(pipe: DictConfig, vae_cfg: DictConfig, trainer: DictConfig, out: Path,
                     vae_path: Path) -> dict:
    """Train the judge on the real train crops; score it on held-out crops and on their VAE reconstructions."""
    device, precision, c = device_of(trainer), str(trainer.precision), pipe.classifier
    dm = hydra.utils.instantiate(vae_cfg.data)
    dm.prepare_data()
    names = list(dm.class_names)
    (train_x, train_y), (val_x, val_y) = clf.load_split(dm, "train"), clf.load_split(dm, "val")
    model = clf.train_classifier(train_x, train_y, len(names), epochs=c.epochs, batch_size=c.batch_size,
                                 lr=c.lr, width=c.width, depth=c.depth, blur=c.blur, seed=pipe.seed,
                                 device=device, precision=precision)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "classifier.safetensors"),
              metadata={"config": OmegaConf.to_yaml(OmegaConf.create(model.config))})
    val = clf.class_accuracy(clf.predict(model, val_x, precision=precision), val_y, len(names))
    recons = reconstruct(vae_path, val_x, device)
    recon = clf.class_accuracy(clf.predict(model, recons, precision=precision), val_y, len(names))
    log.info("classifier: held-out accuracy %.3f (%s)", val["accuracy"],
             clf.format_per_class(val["per_class"], names))
    return {"params": _params(model), "epochs": int(c.epochs), "blur": float(c.blur),
            "train_samples": len(train_y), "val_samples": len(val_y), "val_accuracy": val["accuracy"],
            "val_per_class": val["per_class"], "recon_accuracy": recon["accuracy"],
            "recon_per_class": recon["per_class"]}


@torch.no_grad()
def reconstruct(vae_path: Path, pixels: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """VAE reconstructions (posterior mean) of uint8 pixels (N, H, W, 3): (N, 3, H, W) in [-1, 1] on the CPU."""
    vae = load_vae(vae_path).to(device)
    out = [vae.decode(vae.encode(normalize(chunk.to(device))).mode()).clamp(-1, 1).cpu()
           for chunk in pixels.split(batch_size)]
    return torch.cat(out)


def load_classifier(path: Path, device: torch.device) -> SmallCNN:
    """The classifier stage's SmallCNN, rebuilt from the config in its safetensors metadata."""
    with safe_open(str(path), "pt") as f:
        config = OmegaConf.to_container(OmegaConf.create(f.metadata()["config"]))
    model = SmallCNN(**config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


# ---------------------------------------------------------------- samples


@torch.no_grad()
def generate(module: torch.nn.Module, labels: list[Any], scale: float, steps: int, batch_size: int, seed: int,
             precision: str, latent_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Samples for `labels` (or prompts) at one guidance scale, in seeded batches: (N, 3, H, W) in [-1, 1] on the
    CPU."""
    sampler, out = partial(module.diffusion.sampler, num_steps=steps), []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        with clf.autocast(module.device, precision):
            out.append(module.sample(chunk, len(chunk), scale, seed=seed + start, sampler=sampler,
                                     latent_shape=latent_shape).float().cpu())
    return torch.cat(out)


def aspect_grids(module: torch.nn.Module, pipe: DictConfig, names: list[str], columns: int, zoom: int,
                 out: Path, precision: str) -> list[dict]:
    """One grid per `sample.sizes` (H, W) at the largest guidance: one convolutional model samples any size."""
    s, f, results = pipe.sample, module.vae.downsample_factor, []
    channels, scale = int(module.unet.config["in_channels"]), max(map(float, s.guidance))
    for h, w in s.get("sizes") or []:
        images = generate(module, clf.sample_labels(len(names), columns), scale, s.steps, s.batch_size, pipe.seed,
                          precision, (channels, h // f, w // f))
        grid = out / f"grid_{w}x{h}.png"  # W×H, as the report names it
        labelled_grid(images, names, columns, zoom).save(grid)
        results.append({"height": int(h), "width": int(w), "scale": scale, "grid": _relative(grid, out.parent)})
    return results


def samples_stage(pipe: DictConfig, trainer: DictConfig, out: Path, ckpt: Path, classifier: Path,
                  names: list[str], data: DictConfig, vae_path: Path) -> dict:
    """Grids (one row per class) at each guidance scale; class accuracy of all samples by the classifier, and
    the domain FID/KID of the samples and of the held-out crops' reconstructions on its features."""
    device, precision, s = device_of(trainer), str(trainer.precision), pipe.sample
    dm = hydra.utils.instantiate(data)
    held_out = clf.load_split(dm, "val")[0]
    image_sets = {"reconstructions": reconstruct(vae_path, held_out, device)}
    module = load_ldm(ckpt, use_ema=True).to(device)
    judge = load_classifier(classifier, device)
    labels = clf.sample_labels(len(names), s.per_class)
    # the judge's size, image_size² (with buckets the last training batch's shape is any bucket's)
    size, f = int(dm.decoder.image_size), module.vae.downsample_factor
    square = (int(module.unet.config["in_channels"]), size // f, size // f)
    zoom = max(1, 96 // size)  # 32 px crops: 3× grid
    columns = min(int(s.grid_columns), int(s.per_class))
    results = []
    for g in map(float, s.guidance):
        images = generate(module, labels, g, s.steps, s.batch_size, pipe.seed, precision, square)
        acc = clf.class_accuracy(clf.predict(judge, images, precision=precision), torch.tensor(labels), len(names))
        log.info("guidance %g: class accuracy %.3f (%s)", g, acc["accuracy"],
                 clf.format_per_class(acc["per_class"], names))
        shown = images.view(len(names), s.per_class, *images.shape[1:])[:, :columns].flatten(0, 1)
        grid = out / f"grid_g{g:g}.png"
        labelled_grid(shown, names, columns, zoom).save(grid)
        results.append({"scale": g, "n": len(labels), "accuracy": acc["accuracy"], "per_class": acc["per_class"],
                        "grid": _relative(grid, out.parent)})
        image_sets[f"g{g:g}"] = images
    domain = domain_scores(classifier, held_out, image_sets, device)
    log.info("domain FID (%s features): %s", domain["features"],
             ", ".join(f"{k} {v['fid']:.3g}" for k, v in domain["sets"].items()))
    return {"guidance": results, "domain": domain, "per_class": int(s.per_class), "grid_columns": columns,
            "sizes": aspect_grids(module, pipe, names, columns, zoom, out, precision),
            "steps": int(s.steps),
            "sampler": getattr(module.diffusion.sampler, "func", module.diffusion.sampler).__name__,
            "grid_scale": zoom}
