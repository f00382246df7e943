"""The pipeline's report: `report.md` + PNGs in the pipeline dir, from the stages' result dicts.

Every number in the report comes from a stage's `result.json` (also gathered in `results.json`), so the
Markdown is a view of the data, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmlab.compare import csv_series, plot

Series = dict[str, list[tuple[int, float]]]


# ---------------------------------------------------------------- metrics of a run dir


def read_series(run_dir: Path) -> Series:
    """Every numeric metric of a run dir's `csv/metrics.csv` against the step."""
    return csv_series(run_dir / "csv" / "metrics.csv")


def last_value(series: Series, key: str) -> float | None:
    """The last logged value of `key`, or None."""
    points = series.get(key)
    return points[-1][1] if points else None


def mean_of_last(series: Series, key: str, n: int = 10) -> float | None:
    """Mean of the last n logged values of a noisy metric (train losses are logged per batch)."""
    points = series.get(key)
    return sum(v for _, v in points[-n:]) / len(points[-n:]) if points else None


def smooth(points: Sequence[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Non-overlapping window means: at most len/window points, each at its window's last step."""
    window = max(1, window)
    return [(points[i + window - 1][0], sum(v for _, v in points[i:i + window]) / window)
            for i in range(0, len(points) - window + 1, window)]


def loss_curve_png(series: Series, out: Path, train_key: str = "train/loss", val_key: str = "val/loss") -> Path:
    """PNG of the training loss (window means, ≤ 50 points) and the validation loss against the step."""
    train = series.get(train_key, [])
    curves = {"train": smooth(train, math.ceil(len(train) / 50))} if train else {}
    if series.get(val_key):
        curves["val"] = series[val_key]
    if not curves:
        raise ValueError(f"no {train_key} or {val_key} logged: nothing to plot")
    plot(curves, "LDM loss", out, label="{}")
    return out


# ---------------------------------------------------------------- the Markdown


def _fmt(value: Any, spec: str = ".3f") -> str:
    missing = value is None or (isinstance(value, float) and not math.isfinite(value))
    return "n/a" if missing else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def vae_section(vae: dict) -> list[str]:
    """Section 1: the first stage's f, held-out PSNR/SSIM, size and reconstructions."""
    size, (c, h, w) = vae["image_size"], vae["latent_shape"]
    intro = (f"Trained {vae['steps']} steps × batch {vae['batch_size']} on {vae['train_samples']} crops "
             f"({_minutes(vae.get('seconds'))}); scored on the {vae['val_samples']} held-out crops (a strip of "
             "each photo that no training crop touches), reconstructing from the posterior mean.")
    lines = ["## 1. First stage: KL-VAE", "", intro, "", "| | |", "|---|---|",
             f"| downsampling factor f | **{vae['f']}** ({size}×{size}×3 pixels → {h}×{w}×{c} latents) |",
             f"| val PSNR | **{_fmt(vae['val_psnr'], '.2f')} dB** |",
             f"| val SSIM | **{_fmt(vae['val_ssim'])}** |",
             f"| parameters | {vae['params'] / 1e6:.2f} M |", ""]
    if vae.get("reconstructions"):
        lines += [f"![reconstructions]({vae['reconstructions']})", "",
                  "Top: held-out crops; bottom: their reconstructions.", ""]
    return lines


def ldm_section(latents: dict, ldm: dict) -> list[str]:
    """Section 2: the latent cache, the LDM's size, losses and loss curve."""
    cache = (f"`ldmlab.cache_latents` encoded {latents['train_samples']} train + {latents['val_samples']} val "
             f"crops into {tuple(latents['latent_shape'])} latents (posterior mean and std) in "
             f"`{latents['dir']}/`.")
    if latents.get("buckets"):  # aspect-ratio buckets: one latent shape per bucket
        cache = cache.replace(f"{tuple(latents['latent_shape'])} latents",
                              f"latents of one shape per bucket ({', '.join(map(str, map(tuple, latents['buckets'])))})")
    unet = (f"The U-Net ({ldm['params'] / 1e6:.2f} M parameters, label = source photo, CFG dropout "
            f"p_uncond = {ldm['p_uncond']}) trained {ldm['steps']} steps × batch {ldm['batch_size']} on the "
            f"cached latents ({_minutes(ldm.get('seconds'))}); final train loss (mean of the last 10 logs) "
            f"{_fmt(ldm['train_loss'])}, val loss {_fmt(ldm['val_loss'])}, latent scale "
            f"{_fmt(ldm['latent_scale'])}.")
    return ["## 2. Latent cache and class-conditional LDM", "", cache, "", unet, "",
            f"![LDM loss]({ldm['loss_curve']})", ""]


def sample_section(samples: dict, names: Sequence[str]) -> list[str]:
    """Section 3: one grid per guidance scale."""
    intro = (f"{samples['sampler']} with {samples['steps']} steps, EMA weights, one row per class "
             f"({', '.join(names)}), the first {samples['grid_columns']} of {samples['per_class']} samples per "
             "class.")
    lines = ["## 3. Samples", "", intro, ""]
    for g in samples["guidance"]:
        lines += [f"**Guidance {g['scale']:g}** (class accuracy {_pct(g['accuracy'])})", "",
                  f"![samples at guidance {g['scale']:g}]({g['grid']})", ""]
    for size in samples.get("sizes", []):  # sample.sizes: the same model at other aspect ratios
        lines += [f"**{size['width']}×{size['height']} (W×H)**, guidance {size['scale']:g}", "",
                  f"![samples at {size['width']}×{size['height']}]({size['grid']})", ""]
    return lines


def accuracy_section(clf: dict, samples: dict, names: Sequence[str]) -> list[str]:
    """Section 4: the judge on real held-out crops, on their reconstructions, on the samples; per class."""
    guided = samples["guidance"]
    intro = (f"A small CNN ({clf['params'] / 1e6:.2f} M parameters, {clf['epochs']} epochs, flips and random blur "
             f"up to σ = {clf.get('blur', 0):g} px) trained on the {clf['train_samples']} REAL train crops "
             "classifies images by source photo. Class accuracy of samples = fraction of the samples generated "
             f"for class c that it classifies as c (chance: {100 / len(names):.0f} %).")
    lines = ["## 4. Class accuracy", "", intro, "", "| images | n | accuracy |", "|---|---|---|",
             f"| held-out real crops | {clf['val_samples']} | **{_pct(clf['val_accuracy'])}** |",
             f"| VAE reconstructions of those crops | {clf['val_samples']} | {_pct(clf['recon_accuracy'])} |"]
    lines += [f"| samples, guidance {g['scale']:g} | {g['n']} | **{_pct(g['accuracy'])}** |" for g in guided]
    scales = " | ".join(f"g = {g['scale']:g}" for g in guided)
    lines += ["", "Per class:", "", f"| class | real val | reconstructions | {scales} |",
              "|---" * (3 + len(guided)) + "|"]
    for c, name in enumerate(names):
        cells = [clf["val_per_class"][c], clf["recon_per_class"][c], *(g["per_class"][c] for g in guided)]
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in cells) + " |")
    return lines + [""]


def domain_section(samples: dict) -> list[str]:
    """Section 5: domain FID/KID/precision/recall on the judge's features (absent in reports of older runs)."""
    domain = samples.get("domain")
    if domain is None:
        return []
    intro = (f"Fréchet distance, KID and k-NN precision/recall (k = 3) of each image set against the "
             f"{domain['reference_n']} held-out real crops, on the judge's pooled features "
             f"(`{domain['features']}`: no download; comparable between runs of this demo, not with published "
             "FIDs). The reconstructions are the floor: every sample passes through the same decoder.")
    lines = ["## 5. Domain FID / KID", "", intro, "", "| images | FID | KID | precision | recall |",
             "|---|---|---|---|---|"]
    for name, m in domain["sets"].items():
        label = "VAE reconstructions of the held-out crops" if name == "reconstructions" else \
            f"samples, guidance {name[1:]}"
        lines.append(f"| {label} | **{m['fid']:.3g}** | {m['kid']:.3g} ± {m['kid_std']:.1g} | "
                     f"{m['precision']:.2f} | {m['recall']:.2f} |")
    return lines + [""]


MEANING = """## What the numbers mean

- **PSNR / SSIM** measure how well the frozen first stage reproduces unseen crops; everything the LDM
  generates passes through its decoder, so this bounds the samples' detail.
- **Held-out accuracy** says how well the judge tells the photos apart at all (chance is 1 / classes). Its
  accuracy on VAE reconstructions shows how much of what it relies on survives the decoder.
- **Class accuracy** of samples is conditional fidelity: guidance 1 is the plain conditional model; higher
  guidance trades diversity for class-typical samples, which can score above the reconstructions. It is not
  an image-quality metric.
- **Domain FID / KID** compare whole sets: how far the samples' feature distribution lies from the held-out
  crops' (lower is better; precision = share of samples inside the real manifold, recall = share of real
  crops inside the samples'). Guidance usually raises precision and lowers recall.
"""


def write_report(root: Path, results: dict[str, dict], title: str) -> Path:
    """Write `<root>/report.md` from the stage results; returns its path."""
    names = results["vae"]["class_names"]
    seconds = sum(r.get("seconds", 0) for r in results.values())
    where = (f"Pipeline dir `{root}`; stages' wall time {_minutes(seconds)} on {results['ldm']['device']}. Each "
             "stage is a run dir under it (`vae/`, `latents/`, `ldm/`, `classifier/`, `samples/`); `results.json` "
             "holds every number below.")
    body = [*vae_section(results["vae"]), *ldm_section(results["latents"], results["ldm"]),
            *sample_section(results["samples"], names),
            *accuracy_section(results["classifier"], results["samples"], names),
            *domain_section(results["samples"])]
    path = root / "report.md"
    path.write_text("\n".join([f"# ldmlab pipeline report: {title}", "", where, "", *body]) + "\n" + MEANING)
    return path
