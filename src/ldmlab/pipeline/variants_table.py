"""The comparison's one table, `<dir>/variants.md`: a row per variant from its stages' results (results.json holds
them all), the best value of each comparable column in bold, and the variants still pending."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]
# column → True when larger is better; the losses are left out: each objective has its own (ε, v, x0, velocity,
# + λ·L_vlb), so their values do not rank the variants
BETTER = {"accuracy": True, "fid": False, "kid": False, "img_per_s": True}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _cell(x: Any, spec: str, bold: bool = False) -> str:
    """`x` formatted (`%` spec: a fraction as a percentage), bold when it is the column's best; n/a if not finite."""
    if not _finite(x):
        return "n/a"
    text = f"{100 * x:.1f} %" if spec == "%" else format(x, spec)
    return f"**{text}**" if bold else text


def rows(results: dict[str, Any]) -> list[Row]:
    """One flat row per finished variant: accuracy per guidance scale, FID/KID at the largest, losses, speed."""
    out = []
    for name, v in results["variants"].items():
        ldm, samples = v["ldm"], v["samples"]
        top = max(g["scale"] for g in samples["guidance"])
        domain = samples["domain"]["sets"][f"g{top:g}"]
        out.append({"name": name, "overrides": results.get("overrides", {}).get(name, []),
                    "sampler": f"{samples['sampler'].removesuffix('_sample')} {samples['steps']}",
                    "accuracy": {g["scale"]: g["accuracy"] for g in samples["guidance"]}, "scale": top,
                    "fid": domain["fid"], "kid": domain["kid"], "train_loss": ldm["train_loss"],
                    "val_loss": ldm["val_loss"], "img_per_s": ldm.get("img_per_s"), "seconds": ldm.get("seconds"),
                    "grid": f"variants/{name}/" + next(g["grid"] for g in samples["guidance"] if g["scale"] == top)})
    return out


def best(values: list[Any], larger: bool) -> Any:
    """The best finite value of a column, or None."""
    finite = [x for x in values if _finite(x)]
    return (max if larger else min)(finite) if finite else None


def table(table_rows: list[Row]) -> list[str]:
    """The Markdown table: class accuracy at each guidance scale, FID/KID at the largest, losses, img/s, seconds."""
    scales = sorted({s for r in table_rows for s in r["accuracy"]})
    top = max(scales)
    tops = {k: best([r[k] for r in table_rows], BETTER[k]) for k in ("fid", "kid", "img_per_s")}
    acc_tops = {s: best([r["accuracy"].get(s) for r in table_rows], True) for s in scales}
    head = ["variant", "overrides", "sampler", *(f"class acc. g={s:g}" for s in scales), f"FID g={top:g}",
            f"KID g={top:g}", "train loss", "val loss", "img/s", "LDM stage s", "samples"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows:
        acc = [_cell(r["accuracy"].get(s), "%", r["accuracy"].get(s) == acc_tops[s]) for s in scales]
        cells = [f"**{r['name']}**", " ".join(f"`{o}`" for o in r["overrides"]) or "(the preset's LDM)",
                 r["sampler"], *acc, _cell(r["fid"], ".3g", r["fid"] == tops["fid"]),
                 _cell(r["kid"], ".3g", r["kid"] == tops["kid"]), _cell(r["train_loss"], ".4f"),
                 _cell(r["val_loss"], ".4f"), _cell(r["img_per_s"], ".0f", r["img_per_s"] == tops["img_per_s"]),
                 _cell(r["seconds"], ".0f"), f"[g={top:g}]({r['grid']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def winners(table_rows: list[Row]) -> str:
    """`Best — class accuracy at g=4: flow (97.0 %); FID: ...`: which variant wins each comparable column."""
    scales = sorted({s for r in table_rows for s in r["accuracy"]})
    columns = [(f"class accuracy at g={s:g}", [r["accuracy"].get(s) for r in table_rows], True, "%") for s in scales]
    columns += [(label, [r[key] for r in table_rows], BETTER[key], spec)
                for label, key, spec in (("FID", "fid", ".3g"), ("KID", "kid", ".3g"), ("img/s", "img_per_s", ".0f"))]
    parts = []
    for label, values, larger, spec in columns:
        top = best(values, larger)
        if top is not None:
            names = [r["name"] for r, x in zip(table_rows, values) if x == top]
            parts.append(f"{label}: {', '.join(names)} ({_cell(top, spec)})")
    return "Best — " + "; ".join(parts) + "." if parts else "No finished variant yet."


def intro(results: dict[str, Any], first: Row | None) -> str:
    """What every row shares: the VAE, the latents, the judge, the step budget, how each column was measured."""
    vae, clf, latents = results["vae"], results["classifier"], results["latents"]
    v = next(iter(results["variants"].values()), None)
    if v is None or first is None:
        return "No variant has finished yet."
    ldm, samples, domain = v["ldm"], v["samples"], v["samples"]["domain"]
    floor = domain["sets"].get("reconstructions", {}).get("fid")
    return (f"Every variant trained {ldm['steps']} steps × batch {ldm['batch_size']} on {ldm['device']}, on the same "
            f"VAE (f = {vae['f']}, held-out PSNR {vae['val_psnr']:.2f} dB), the same {latents['train_samples']} "
            f"cached latents {tuple(latents['latent_shape'])} and scored by the same judge (held-out accuracy "
            f"{100 * clf['val_accuracy']:.1f} %). Class accuracy: {samples['per_class']} samples per class at each "
            "guidance scale (EMA weights, each variant's own sampler). FID/KID: those samples against the "
            f"{domain['reference_n']} held-out crops on the judge's features (`{domain['features']}`; the crops' "
            f"VAE reconstructions score FID {_cell(floor, '.3g')}, the floor through this decoder). Train loss: mean "
            "of the last 10 logs; val loss: the end's, on fixed noise. Losses are each objective's own (ε, v, x0, "
            "velocity; + λ·L_vlb with a learned variance) and do not rank the variants. img/s: batch / seconds "
            f"per step of the train.py loop after its first {ldm.get('timer_skip', ldm['steps'] - ldm.get('timed_steps', 0))} "
            "steps (StepTimer: the compile and CUDA-graph capture of a GPU run left out; data, EMA and logging in). "
            "LDM stage s: its wall time, start-up, compile, validation and checkpoints included.")


def write_table(root: Path, results: dict[str, Any], title: str) -> Path:
    """Write `<root>/variants.md` (the table, what wins, what is pending); returns its path."""
    table_rows = rows(results)
    lines = [f"# LDM variants at one step budget: {title}", "", intro(results, table_rows[0] if table_rows else None),
             ""]
    if table_rows:
        lines += [*table(table_rows), "", winners(table_rows), ""]
    if results.get("pending"):
        lines += [f"Pending (not trained yet: run the same command again): {', '.join(results['pending'])}.", ""]
    path = root / "variants.md"
    path.write_text("\n".join(lines))
    return path
