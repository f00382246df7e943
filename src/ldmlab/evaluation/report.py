"""The evaluation command's outputs: a Markdown table (one row per guidance scale, and for an image-conditioned
model its baselines' rows) and the FID-against-IS curve (classifier-free guidance trades diversity for fidelity:
Ho & Salimans 2022, Fig. 2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

COLUMNS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("fid", "FID"), ("kid", "KID"), ("is", "IS"),
           ("precision", "precision"), ("recall", "recall"), ("clip_score", "CLIP score"))


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    std = row.get(f"{key}_std")
    return f"{row[key]:.4g} ± {std:.2g}" if std is not None else f"{row[key]:.4g}"


def _label(row: dict) -> str:
    """A row's name in the `images` column: a baseline's own, else the samples' guidance scale."""
    return row["images"] if "images" in row else f"samples, guidance {row['guidance']:g}"


def markdown_table(rows: Sequence[dict], header: str, baselines: Sequence[dict] = ()) -> str:
    """`header`, then | guidance | <each metric present> | with one line per row; with `baselines` (other image
    sets scored alike, named by their "images" key) the first column is | images | and they follow the rows."""
    every = [*rows, *baselines]
    present = [(k, name) for k, name in COLUMNS if any(k in r for r in every)]
    first, label = ("images", _label) if baselines else ("guidance", lambda r: f"{r['guidance']:g}")
    lines = [header, "", f"| {first} | " + " | ".join(name for _, name in present) + " |",
             "|---" * (len(present) + 1) + "|"]
    lines += [f"| {label(r)} | " + " | ".join(_cell(r, k) for k, _ in present) + " |" for r in every]
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: Sequence[dict], path: Path, features: str) -> Path:
    """FID against IS (FID against guidance when the features have no logits), each point labelled by scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = "is" if all("is" in r for r in rows) else "guidance"
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs, ys = [r[x_key] for r in rows], [r["fid"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"w={r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"Inception Score ({features} logits)" if x_key == "is" else "guidance scale")
    ax.set_ylabel("FID")
    ax.set_title(f"{'FID vs IS' if x_key == 'is' else 'FID vs guidance'} ({features} features)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict], out: Path, header: str, features: str,
                 baselines: Sequence[dict] = ()) -> list[Path]:
    """report.md, results.json and tradeoff.png (the rows' FID against IS) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown_table(rows, header, baselines))
    results = {"features": features, "rows": list(rows), **({"baselines": list(baselines)} if baselines else {})}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    paths = [out / "report.md", out / "results.json"]
    if rows and all("fid" in r for r in rows):
        paths.append(plot_tradeoff(rows, out / "tradeoff.png", features))
    return paths
