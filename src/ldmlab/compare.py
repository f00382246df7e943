"""Compare the jobs of a Hydra multirun: a Markdown table of what differs and the final metric, plus a plot.

    python -m ldmlab.compare <sweep dir> [--metric val/psnr] [--plot out.png]

Each job dir `<sweep>/<n>/` gives its overrides (`.hydra/overrides.yaml`) and config (`.hydra/config.yaml`, whose
`optimized_metric` is the default metric). Metrics come from the CSV logger (`csv/metrics.csv`) or, for a job
without one, from its W&B offline run (`wandb/offline-run-*/run-*.wandb`, read directly as protobuf records with
`wandb.proto`; wandb 0.31 no longer ships `wandb.sdk.internal.datastore`). x is the trainer's global step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

Series = dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]


class CompareError(Exception):
    """A problem with the sweep dir or the metric, reported as one line."""


def job_dirs(sweep: Path) -> list[Path]:
    """The job dirs of a multirun (`<n>/.hydra/overrides.yaml`), by job number."""
    jobs = [p for p in sweep.iterdir() if p.name.isdigit() and (p / ".hydra" / "overrides.yaml").is_file()] \
        if sweep.is_dir() else []
    if not jobs:
        raise CompareError(f"{sweep} is not a sweep dir: no <n>/.hydra/overrides.yaml job dirs")
    return sorted(jobs, key=lambda p: int(p.name))


def overrides(job: Path) -> dict[str, str]:
    """The job's Hydra overrides as {key: value}."""
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in items)


def differing(all_overrides: list[dict[str, str]]) -> list[str]:
    """The override keys whose value is not the same in every job, in first-seen order."""
    keys = list(dict.fromkeys(k for ov in all_overrides for k in ov))
    return [k for k in keys if len({ov.get(k) for ov in all_overrides}) > 1]


def default_metric(job: Path) -> str | None:
    """The `optimized_metric` of the job's composed config."""
    cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) or {}
    return cfg.get("optimized_metric")


def _number(text: object) -> float | None:
    """`text` as a finite float, or None."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def csv_series(path: Path) -> Series:
    """Every numeric metric of a CSV logger's metrics.csv, against its `step` column."""
    out: Series = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            for key, text in row.items():
                value = _number(text) if key not in ("step", "epoch") and text else None
                if value is not None and step is not None:
                    out.setdefault(key, []).append((int(step), value))
    return out


def wandb_records(path: Path) -> Iterator:
    """The protobuf records of a `.wandb` file (LevelDB-style log: 7-byte header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:  # block trailer padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_series(path: Path) -> Series:
    """Every numeric metric of an offline W&B run file, against `trainer/global_step` (else `_step`)."""
    out: Series = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        step = _number(row.get("trainer/global_step", row.get("_step")))
        for key, raw in row.items():
            value = _number(raw) if not key.startswith("_") and key != "trainer/global_step" else None
            if value is not None and step is not None:
                out.setdefault(key, []).append((int(step), value))
    return out


def job_series(job: Path) -> Series:
    """The job's metrics: CSV logger first, else its (latest) W&B offline run, else none."""
    csvs = sorted(job.glob("csv/**/metrics.csv"))
    if csvs:
        return csv_series(csvs[-1])
    runs = sorted(job.glob("wandb/offline-run-*/run-*.wandb"))
    return wandb_series(runs[-1]) if runs else {}


def markdown_table(jobs: list[Path], keys: list[str], metric: str, series: list[Series]) -> str:
    """One row per job: number, differing overrides, final value of `metric` (`-` if that job never logged it)."""
    head = ["job", *keys, f"{metric} (final)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job, s in zip(jobs, series):
        ov = overrides(job)
        final = f"{s[metric][-1][1]:.6g}" if s.get(metric) else "-"
        lines.append("| " + " | ".join([job.name, *(ov.get(k, "") for k in keys), final]) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[tuple[int, float]]], metric: str, out: Path, label: str = "job {}") -> None:
    """A PNG of one curve per job (x = step): matplotlib when installed, else drawn with PIL.

    `label` formats each curve's name for the legend (the demo report plots metrics, not jobs).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return plot_pil(curves, metric, out, label=label)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=label.format(name))
    ax.set(xlabel="step", ylabel=metric, title=metric)
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot_pil(curves: dict[str, list[tuple[int, float]]], metric: str, out: Path, size: tuple = (640, 420),
             label: str = "job {}") -> None:
    """A simple line plot with axes, tick labels and a legend of job numbers, drawn with PIL."""
    from PIL import Image, ImageDraw

    w, h, (left, right, top, bottom) = *size, (70, 110, 30, 40)
    points = [p for pts in curves.values() for p in pts]
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*points)]
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-9)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0, 0.5, 1):
        (tx, _), (_, ty) = px(x0 + frac * (x1 - x0), y0), px(x0, y0 + frac * (y1 - y0))
        draw.text((tx - 8, h - bottom + 5), f"{x0 + frac * (x1 - x0):.4g}", fill="black")
        draw.text((5, ty - 6), f"{y0 + frac * (y1 - y0):.4g}", fill="black")
    draw.text((w // 2 - 40, 8), metric, fill="black")
    draw.text(((w - right + left) // 2 - 10, h - 15), "step", fill="black")
    for i, (name, pts) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        xy = [px(x, y) for x, y in pts]
        draw.line(xy, fill=color, width=2) if len(xy) > 1 else None
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=color, width=3)
        draw.text((w - right + 35, top + 4 + 18 * i), label.format(name), fill="black")
    img.save(out)


def compare(sweep: Path, metric: str | None = None, plot_to: Path | None = None) -> str:
    """The Markdown table of a sweep (and its plot written to `plot_to`); raises CompareError."""
    jobs = job_dirs(sweep)
    metric = metric or default_metric(jobs[0])
    if not metric:
        raise CompareError("no --metric given and the config has no optimized_metric")
    series = [job_series(job) for job in jobs]
    if not any(s.get(metric) for s in series):
        available = sorted({k for s in series for k in s})
        raise CompareError(f"metric {metric!r} was never logged; available: {', '.join(available) or 'none'}")
    table = markdown_table(jobs, differing([overrides(j) for j in jobs]), metric, series)
    if plot_to is not None:
        plot({j.name: s[metric] for j, s in zip(jobs, series) if s.get(metric)}, metric, plot_to)
    return table


def main(argv: list[str] | None = None) -> int:
    """CLI: print the table, write the plot; errors as one line on stderr with exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m ldmlab.compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a Hydra multirun dir (holding <n>/.hydra/)")
    parser.add_argument("--metric", help="metric to compare (default: the config's optimized_metric)")
    parser.add_argument("--plot", type=Path, help="write the metric's curve per job to this PNG")
    args = parser.parse_args(argv)
    try:
        print(compare(args.sweep, args.metric, args.plot))
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
