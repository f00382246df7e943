"""`python -m ldmlab.evaluate ckpt=... guidance=1,1.5,2,3,4,6 n=5000 sampler=ddim steps=50`: FID, KID, IS,
precision/recall (and CLIP score for text models) of a checkpoint's samples at each guidance scale, one Markdown
row each and the FID-against-IS curve (conf/evaluate.yaml). Under torchrun or srun the samples are split over
the ranks; finished sample chunks are kept on disk, so a re-run resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ldmlab.configs import CONF_DIR
from ldmlab.evaluation.clip import ClipTowers
from ldmlab.evaluation.features import build_feature_network
from ldmlab.evaluation.paired import PairedScores, grid_rows, held_out_loader, paired_rows, rebatched
from ldmlab.evaluation.reference import cached_reference, describe_data, real_batches, stats_path
from ldmlab.evaluation.report import markdown_table, write_report
from ldmlab.evaluation.samples import Chunk, SampleCache, chunks, from_uint8
from ldmlab.evaluation.score import Plan, check_text_metrics, score_guidance
from ldmlab.lit.conditioning import TextConditioner
from ldmlab.metrics import PIXEL_METRICS, MetricOptions, check_sample_count, reference_statistics
from ldmlab.sample import _sampler, load_ldm, prepare_for_sampling
from ldmlab.utils.images import labelled_grid
from ldmlab.validate.sample import stored_config

log = logging.getLogger("ldmlab.evaluate")


def distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (RANK/WORLD_SIZE) or srun (SLURM_PROCID/SLURM_NTASKS)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))
    rank, local = (int(env.get(k, env.get(s, "0"))) for k, s in (("RANK", "SLURM_PROCID"),
                                                                  ("LOCAL_RANK", "SLURM_LOCALID")))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    where = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29517")
        if cuda:
            torch.cuda.set_device(where)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return rank, world, where


def reference_data(cfg: DictConfig) -> Any:
    """The reference DataModule, set up for its validation split: cfg.data, else the checkpoint's own."""
    node = cfg.data if cfg.data is not None else (stored_config(cfg.ckpt) or {}).get("data")
    if node is None:
        raise ValueError(f"ckpt={cfg.ckpt} stores no data config: give data=<a data config node>")
    datamodule = hydra.utils.instantiate(node, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("validate")
    return datamodule


def default_metrics(module: Any, network: Any) -> tuple[str, ...]:
    """FID, KID, precision/recall; IS where the features have class logits; CLIP score for text models on CLIP."""
    text = isinstance(module.conditioner, TextConditioner) and isinstance(network, ClipTowers)
    return ("fid", "kid", "precision", "recall", *(("is",) if network.has_logits else ()),
            *(("clip_score",) if text else ()))


def samples_key(cfg: DictConfig, data: Any = None) -> str:
    """The sample cache's folder: what makes the samples (checkpoint file, sampler, steps, seed, EMA, batch; the
    held-out data whose conditions an image-conditioned model's samples follow)."""
    ckpt = Path(cfg.ckpt).resolve()
    stat = ckpt.stat()
    what = f"{ckpt}:{stat.st_size}:{stat.st_mtime_ns}:{cfg.sampler}:{cfg.steps}:{cfg.seed}:{cfg.ema}:{cfg.batch_size}"
    what += "" if data is None else f":{json.dumps(data, sort_keys=True, default=str)}"
    return hashlib.sha256(what.encode()).hexdigest()[:12]


@dataclass
class Job:
    """One evaluation's parts: the command's settings, the model and its features, where it runs and writes."""

    cfg: DictConfig
    module: Any
    network: Any
    metrics: tuple[str, ...]
    datamodule: Any
    out: Path
    rank: int
    world: int

    @property
    def options(self) -> MetricOptions:
        """The metrics' knobs, and the settings their refusals name."""
        return MetricOptions(seed=self.cfg.seed, where="evaluate", samples_setting="n", reference_setting="reference_n")


def guides(module: Any) -> bool:
    """Whether the model has an unconditional prediction for guidance to move away from: a class or prompt
    conditioner, or an image condition dropped in training (model.image_condition.p_drop > 0)."""
    condition = module.image_condition
    return module.conditioner is not None or (condition is not None and condition.p_drop > 0)


def check_settings(cfg: DictConfig, module: Any, network: Any) -> tuple[str, ...]:
    """The metrics to compute (cfg.metrics, else the defaults, + PSNR/SSIM for image-conditioned models); each
    setting that cannot work refused in one line before anything is sampled."""
    paired = module.image_condition is not None
    if not guides(module) and any(float(g) != 1 for g in cfg.guidance):
        raise ValueError(f"guidance={list(cfg.guidance)}: {cfg.ckpt} has no unconditional prediction to guide away "
                         "from (no class or prompt conditioner, no model.image_condition.p_drop), so every scale "
                         "gives the same samples: give guidance=1")
    metrics = tuple(cfg.metrics or (*default_metrics(module, network), *(PIXEL_METRICS if paired else ())))
    check_text_metrics(metrics, module, network, "metrics")
    if not paired and (pixel := [m for m in metrics if m in PIXEL_METRICS]):
        raise ValueError(f"metrics: {'/'.join(pixel)} compare samples with their held-out images, which only an "
                         f"image-conditioned model (model.image_condition) has: drop {pixel} from the metrics")
    if paired and cfg.reference_n not in (None, cfg.n):
        raise ValueError(f"reference_n={cfg.reference_n}: an image-conditioned model is scored against the n={cfg.n} "
                         "held-out images its samples are conditioned on: drop reference_n")
    if "fid" in metrics:  # before any sampling: FD's minimum for this feature width
        check_sample_count(cfg.n, network.num_features, "n", "samples per guidance scale")
        check_sample_count(cfg.reference_n or cfg.n, network.num_features, "reference_n", "reference images")
    return metrics


def evaluate(cfg: DictConfig) -> list[dict[str, float]]:
    """Score cfg.n samples at every guidance scale; rank 0 writes the report. Returns one row per scale."""
    rank, world, device = distributed(cfg.device)
    module = load_ldm(cfg.ckpt, cfg.ema).to(device)
    if module.vae is None:
        raise ValueError(f"ckpt={cfg.ckpt} has no VAE: its samples are latents, not images to score")
    args = {"autoencoder": module.vae} if cfg.features.name == "vae" and not cfg.features.path else {}
    network = build_feature_network(cfg.features.name, cfg.features.path, **args).to(device)
    metrics = check_settings(cfg, module, network)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parents[1] / "evaluation"
    job = Job(cfg, module, network, metrics, reference_data(cfg), out, rank, world)
    results, baselines, header = (evaluate_paired if module.image_condition is not None else evaluate_samples)(job)
    if rank == 0:
        for written in write_report(results, out, header, network.name, baselines):
            log.info("wrote %s", written)
        print(markdown_table(results, header, baselines))
    return results


def evaluate_samples(job: Job) -> tuple[list[dict[str, float]], list[dict], str]:
    """Class, text or unconditional models: cfg.n fixed-seed samples per scale against the validation images."""
    cfg, module, network, rank, world = job.cfg, job.module, job.network, job.rank, job.world
    reference_n, datamodule, captions = cfg.reference_n or cfg.n, job.datamodule, []
    prompts = Path(cfg.prompts).read_text().splitlines() if cfg.prompts else captions

    def compute() -> Any:
        images = real_batches(datamodule.val_dataloader(), -(-reference_n // world), module.vae, captions)
        return reference_statistics(network, (from_uint8(p, module.device) for p in images), source=str(cfg.ckpt))

    path = stats_path(cfg.stats_dir or job.out / "reference", describe_data(datamodule), network.name, reference_n)
    reference, rows = cached_reference(path, compute, write=rank == 0)
    if not prompts and isinstance(module.conditioner, TextConditioner):  # statistics from the cache: read captions
        list(real_batches(datamodule.val_dataloader(), reference_n, module.vae, captions))
    plan = Plan(cfg.n, cfg.batch_size, cfg.seed, job.metrics, _sampler(module, cfg.sampler, cfg.steps), prompts)
    autocast = prepare_for_sampling(module, cfg.bf16, cfg.compile)
    cache = SampleCache(job.out / "samples" / samples_key(cfg))
    total = len(chunks(cfg.n, cfg.batch_size, rank, world)) * len(cfg.guidance)
    results = []
    with tqdm(total=total, desc="sample chunks", disable=rank != 0) as bar:
        for guidance in cfg.guidance:
            with autocast:
                scores = score_guidance(module, network, reference, rows, float(guidance), plan, rank, world,
                                        job.options, cache, on_chunk=lambda *_: bar.update())
            results.append({"guidance": float(guidance), **scores})
    header = (f"`{cfg.ckpt}`: {cfg.n} samples per guidance scale, sampler {cfg.sampler or 'of the model'}, "
              f"{cfg.steps or 'its default'} steps, features **{network.name}**, reference {reference!r}")
    return results, [], header


def evaluate_paired(job: Job) -> tuple[list[dict[str, float]], list[dict], str]:
    """Image-conditioned models: sample i conditioned on held-out image i's condition and scored against image i,
    beside the baselines (the condition's picture, the VAE reconstruction); rank 0 writes grid.png."""
    cfg, module, network, rank, world = job.cfg, job.module, job.network, job.rank, job.world
    data = describe_data(job.datamodule)

    def pairs() -> Iterator[tuple[Chunk, dict]]:  # this rank's chunks of the first n held-out images
        return (p for p in rebatched(held_out_loader(job.datamodule), cfg.n, cfg.batch_size, cfg.seed)
                if p[0].index % world == rank)

    def compute() -> Any:
        images = (batch["image"].to(module.device) for _, batch in pairs())
        return reference_statistics(network, images, source=f"{cfg.ckpt} (held-out images)")

    path = stats_path(cfg.stats_dir or job.out / "reference", {"paired": data}, network.name, cfg.n)
    reference = cached_reference(path, compute, write=rank == 0)
    sampler = _sampler(module, cfg.sampler, cfg.steps)
    scores = PairedScores(network, reference, pairs, Plan(cfg.n, cfg.batch_size, cfg.seed, job.metrics), job.options)
    autocast = prepare_for_sampling(module, cfg.bf16, cfg.compile)
    cache = SampleCache(job.out / "samples" / samples_key(cfg, data))
    total = len(chunks(cfg.n, cfg.batch_size, rank, world)) * len(cfg.guidance)
    with autocast, tqdm(total=total, desc="sample chunks", disable=rank != 0) as bar:
        results, others = paired_rows(module, scores, [float(g) for g in cfg.guidance], sampler, cache,
                                      on_chunk=lambda *_: bar.update())
        if rank == 0 and cfg.grid > 0:
            images, names = grid_rows(module, next(pairs()), [float(g) for g in cfg.guidance], sampler, cache, cfg.grid)
            labelled_grid(images, names, len(images) // len(names)).save(job.out / "grid.png", optimize=True)
    header = (f"`{cfg.ckpt}`: {cfg.n} held-out images, sample i conditioned on image i's "
              f"{type(module.image_condition).__name__} condition and scored against image i, sampler "
              f"{cfg.sampler or 'of the model'}, {cfg.steps or 'its default'} steps, features **{network.name}** "
              f"(reference: the same {cfg.n} images); grid.png: the first images")
    return results, others, header


def _lists_from_commas(argv: list[str]) -> list[str]:
    """`guidance=1,1.5,2` → `guidance=[1,1.5,2]`: a list here, where Hydra would ask for --multirun."""
    return [re.sub(r"^(guidance|metrics)=([^\[].*,.*)$", r"\1=[\2]", a) for a in argv]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if not OmegaConf.is_list(cfg.guidance):
        cfg.guidance = [cfg.guidance]
    try:
        evaluate(cfg)
    except (ValueError, FileNotFoundError) as err:  # a setting or a file: its one line, not a traceback
        print(f"ldmlab.evaluate: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_lists_from_commas(sys.argv[1:])]
    main()
