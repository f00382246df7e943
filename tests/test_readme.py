"""Every `python train.py ...` command in the README composes against the real config tree."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, compose_train
from omegaconf import OmegaConf


def readme_train_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python train.py"):
                # a shell substitution stands for a path the user's earlier run wrote
                line = re.sub(r"\$\([^)]*\)", "/tmp/from-an-earlier-run", line)
                commands.append(shlex.split(line)[2:])
    return commands


def first_sweep_value(override: str) -> str:
    """`k=a,b` → `k=a` (compose takes one value; the sweep itself is tested by running it)."""
    key, _, value = override.partition("=")
    if "," in value and not value.startswith(("[", "'", '"')):
        return f"{key}={value.split(',')[0]}"
    return override


@pytest.mark.parametrize("args", readme_train_commands(), ids=lambda a: " ".join(a)[:60] or "<none>")
def test_readme_command_composes(args: list[str], tmp_path: Path) -> None:
    overrides = [first_sweep_value(a) for a in args if not a.startswith("-")]
    cfg = compose_train(overrides, tmp_path)
    assert OmegaConf.select(cfg, "model._target_")


def test_readme_has_train_commands() -> None:
    assert len(readme_train_commands()) >= 8
