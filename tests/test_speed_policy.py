"""The speed policy is applied from outside the networks (STYLE 16): no class in ldmlab/nn or ldmlab/lit stores a
compile, CUDA-graph or kernel-fusion flag or a compile method, and the policy (ldmlab.accel,
ldmlab.callbacks.speed) reads none off a model."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ldmlab"
# names that would be a speed decision stored on a network or a LightningModule
SPEED_FLAG = re.compile(r"compile|graph|fuse|channels_last|cast_matmul|repeated_blocks|sdpa", re.IGNORECASE)


def class_members(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(class, member, line) for every class attribute, `self.<name>` assignment and method of each class."""
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in cls.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((cls.name, node.name, node.lineno))
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            found += [(cls.name, t.id, node.lineno) for t in targets if isinstance(t, ast.Name)]
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else []
            found += [(cls.name, t.attr, node.lineno) for t in targets
                      if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"]
    return found


@pytest.mark.parametrize("package", ["nn", "lit"])
def test_no_class_in_the_networks_or_modules_carries_a_speed_flag(package: str) -> None:
    flags = [f"{path.relative_to(SRC)}:{line} {cls}.{name}"
             for path in sorted((SRC / package).rglob("*.py"))
             for cls, name, line in class_members(ast.parse(path.read_text()))
             if SPEED_FLAG.search(name)]
    assert not flags, f"speed flags on classes (decide them in ldmlab.accel / callbacks.speed instead): {flags}"


def test_the_scan_sees_a_flag() -> None:
    """The scan itself: each way of storing a flag is found."""
    code = ("class A:\n    cuda_graphs_safe = True\n    compile_scope: str = 'regional'\n"
            "    def __init__(self):\n        self.fused_qkv = False\n    def compile_whole(self): ...\n")
    assert [name for _, name, _ in class_members(ast.parse(code))] == \
        ["cuda_graphs_safe", "compile_scope", "__init__", "compile_whole", "fused_qkv"]


@pytest.mark.parametrize("path", ["accel.py", "callbacks/speed.py"])
def test_the_policy_reads_no_flag_off_a_model(path: str) -> None:
    text = (SRC / path).read_text()
    read = [name for name in ("cuda_graphs_safe", "compile_scope", "_repeated_blocks", "compile_whole",
                              "compile_trunk", "_compiled_trunk", "fused_qkv") if re.search(rf"\b{name}\b", text)]
    assert not read, f"{path} reads {read}"
    calls = [n.func.id for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id == "getattr"]
    assert not calls, f"{path} looks attributes up by name"
