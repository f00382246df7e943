"""The pure layers (nn, diffusion, losses) import torch only: checked statically and at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ldmlab"
PURE_LAYERS = ["nn", "diffusion", "losses"]
FORBIDDEN = {"lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "wandb",
             "torchvision", "diffusers", "transformers", "torchmetrics"}
# a pure layer may import these ldmlab packages (and nothing above it)
ALLOWED_LDMLAB = {"ldmlab.nn", "ldmlab.diffusion", "ldmlab.losses"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from ldmlab import validate`
    return names


@pytest.mark.parametrize("layer", PURE_LAYERS)
def test_pure_layer_imports_statically(layer: str) -> None:
    files = sorted((SRC / layer).rglob("*.py"))
    assert files, f"no files in ldmlab/{layer}"
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.relative_to(SRC)} imports {name}"
            if top == "ldmlab":
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED_LDMLAB), \
                    f"{path.relative_to(SRC)} imports {name}: pure layers may not import the Lightning layer"


def test_pure_layers_load_no_framework_at_runtime() -> None:
    modules = [f"ldmlab.{layer}.{p.stem}" for layer in PURE_LAYERS
               for p in sorted((SRC / layer).glob("*.py")) if p.stem != "__init__"]
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, f"pure layers pulled in {proc.stdout} {proc.stderr[-2000:]}"


def test_lightning_modules_live_in_lit() -> None:
    """LightningModule subclasses are defined only under ldmlab/lit."""
    for path in SRC.rglob("*.py"):
        if "lit" in path.relative_to(SRC).parts:
            continue
        assert "(pl.LightningModule)" not in path.read_text(), f"{path} defines a LightningModule outside lit/"


# (package, package it may not import): the direction of the seams (STYLE 17). The modules declare what the
# callbacks may use (lit.contract), so lit never needs a callback; data does not know about checkpoints; callbacks
# give their errors from ldmlab.messages, not from the config checker.
FORBIDDEN_EDGES = [("lit", "ldmlab.callbacks"), ("data", "ldmlab.checkpointing"), ("callbacks", "ldmlab.validate")]


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN_EDGES, ids=[f"{p}-{f}" for p, f in FORBIDDEN_EDGES])
def test_import_directions(package: str, forbidden: str) -> None:
    """No module of `package` imports `forbidden`, at the top or inside a function."""
    files = sorted((SRC / package).rglob("*.py"))
    assert files, f"no files in ldmlab/{package}"
    for path in files:
        for name in imported_modules(path):
            assert not (name == forbidden or name.startswith(forbidden + ".")), \
                f"{path.relative_to(SRC)} imports {name}"
