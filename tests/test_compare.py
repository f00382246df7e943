"""`python -m ldmlab.compare`: a sweep's differing overrides, final metric and curves; W&B offline runs of a sweep."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_offline_wandb
from PIL import Image

from ldmlab.compare import CompareError, compare, main


def offline_run(job: Path) -> dict:
    """The only offline W&B run of a job."""
    (path,) = job.glob("wandb/offline-run-*/run-*.wandb")
    return read_offline_wandb(path)


def test_many_loggers_sweep_wandb_runs_and_compare(vae_sweep: tuple[Path, str], tmp_path: Path) -> None:
    """Four jobs with logger=many: four offline W&B runs (own config, override tags, one group); compare lists
    them with the two overrides that differ."""
    sweep = tmp_path / "grid"
    shutil.copytree(vae_sweep[0], sweep)  # a copy: the CSV logs are moved aside below
    runs = [offline_run(sweep / str(n)) for n in range(4)]
    assert {r["group"] for r in runs} == {"debug-grid"} and len({r["id"] for r in runs}) == 4
    assert {r["job_type"] for r in runs} == {"sweep"}
    points = [(kl, lr) for kl in ("1e-06", "1e-05") for lr in ("0.0002", "0.0005")]  # Hydra's sweep order
    for run, (kl, lr) in zip(runs, points, strict=True):
        assert run["tags"][0] == "dev" and f"model.loss.kl_weight={kl}" in run["tags"] and "logger=many" in run["tags"]
        assert f"optimizer.lr={lr}" in run["tags"]
        assert all(len(t) <= 64 for t in run["tags"])  # long path overrides are shortened, not rejected
        assert run["config"]["model"]["loss"]["kl_weight"] == float(kl)
        assert run["config"]["optimized_metric"] == "val/psnr"
    png = tmp_path / "psnr.png"
    proc = subprocess.run([sys.executable, "-m", "ldmlab.compare", str(sweep), "--plot", str(png)], check=False,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # only the overrides that differ: not TINY's, not logger=many, not the sweep dir
    assert lines[0] == "| job | model.loss.kl_weight | optimizer.lr | val/psnr (final) |"
    rows = [line.split(" | ") for line in lines[2:6]]
    assert [r[:3] for r in rows] == [[f"| {n}", kl, lr] for n, (kl, lr) in enumerate(points)]
    assert all(float(r[3].rstrip(" |")) > 0 for r in rows)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 200 and len(img.getcolors(1 << 16)) > 3
    # without the CSV logs the same values come from the W&B offline runs
    for n in range(4):
        (sweep / str(n) / "csv" / "metrics.csv").rename(sweep / str(n) / "csv" / "metrics.bak")
    assert compare(sweep).splitlines()[2:] == lines[2:6]


def make_job(sweep: Path, n: int, overrides: list[str], csv_text: str | None) -> None:
    """A fake job dir with .hydra files and optionally a CSV logger file."""
    (sweep / str(n) / ".hydra").mkdir(parents=True)
    (sweep / str(n) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (sweep / str(n) / ".hydra" / "config.yaml").write_text("optimized_metric: val/loss\n")
    if csv_text:
        (sweep / str(n) / "csv").mkdir()
        (sweep / str(n) / "csv" / "metrics.csv").write_text(csv_text)


def test_compare_table_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Differing overrides only, last logged value, `-` for a job without it; one-line errors with status 2."""
    make_job(tmp_path, 0, ["a=1", "b=x"], "epoch,step,val/loss,train/loss\n0,1,,0.9\n0,2,0.5,\n0,4,0.25,\n")
    make_job(tmp_path, 1, ["a=1", "b=y", "c=3"], "epoch,step,train/loss\n0,1,0.8\n")
    assert compare(tmp_path).splitlines() == ["| job | b | c | val/loss (final) |", "|---|---|---|---|",
                                              "| 0 | x |  | 0.25 |", "| 1 | y | 3 | - |"]
    assert compare(tmp_path, "train/loss").splitlines()[2:] == ["| 0 | x |  | 0.9 |", "| 1 | y | 3 | 0.8 |"]
    with pytest.raises(CompareError, match="never logged; available: train/loss, val/loss"):
        compare(tmp_path, "val/psnr")
    assert main([str(tmp_path / "0")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a sweep dir" in err
    png = tmp_path / "loss.png"
    assert main([str(tmp_path), "--metric", "train/loss", "--plot", str(png)]) == 0
    with Image.open(png) as img:
        assert img.size[0] > 100
