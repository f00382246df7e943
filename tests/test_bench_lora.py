"""The LoRA speed benchmark's CPU rehearsal (bench.lora --tiny): the ours/PEFT parameter parity it asserts before
timing, against the closed-form count; one ours and one PEFT row timed and written as Markdown; the pairing of
rows in its table (the timing itself needs the H200: python -m ldmlab.bench.lora → docs/BENCHMARKS.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ldmlab.bench import gpu, lora, lora_models


def tiny_lora_params(rank: int) -> tuple[int, int]:
    """(parameters, layers) of rank-`rank` adapters on every attention q/k/v/out of bench.lora.TINY, by hand.

    A transformer of width C with context D has 8 adapted layers: attn1's q, k, v, out and attn2's q, out map
    C → C, r(C + C) each; attn2's k, v map D → C, r(D + C) each. Each attention level holds num_res_blocks
    transformers on the way down and num_res_blocks + 1 on the way up; the middle block one at the last width.
    """
    cfg = lora.TINY
    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    per_level = 2 * cfg["num_res_blocks"] + 1
    blocks = [widths[i] for i in cfg["attention_levels"] for _ in range(per_level)] + [widths[-1]]
    params = sum(6 * rank * 2 * c + 2 * rank * (cfg["context_dim"] + c) for c in blocks)
    return params, 8 * len(blocks)


@pytest.mark.parametrize("peft", ["installed", "missing"])
def test_tiny_rehearsal_times_ours_and_peft_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch, peft: str) -> None:
    if peft == "missing":  # as on a machine without peft: the PEFT rows go, with the reason printed
        monkeypatch.setattr(lora, "peft_available", lambda: False)
    have_peft = lora.peft_available()
    out = tmp_path / "bench.md"
    text = lora.main(["--tiny", "--variants", "ours:4,peft:4", "--iters", "1", "--out", str(out)])
    assert out.read_text() == "\n" + text
    assert "### LoRA training step, tiny U-Net (CPU rehearsal), 64 px, batch 2 (" in text
    assert "    python -m ldmlab.bench.lora --tiny --variants ours:4,peft:4 --iters 1 --out" in text
    params, layers = tiny_lora_params(4)
    assert f"rank 4: {params / 1e6:.2f} M in {layers} layers" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert rows["ours:4"][1:3] == ["4", f"{params / 1e6:.2f}"] and float(rows["ours:4"][3]) > 0
    if not have_peft:
        assert "PEFT rows skipped: peft is not installed" in capsys.readouterr().out and "peft:4" not in rows
        return
    assert "ours = PEFT, checked on the meta device" in text
    assert rows["peft:4"][1:3] == ["4", f"{params / 1e6:.2f}"] and rows["peft:4"][-1].startswith("add_adapter")
    ours, peft = float(rows["ours:4"][3]), float(rows["peft:4"][3])  # img/s as printed, rounded to 0.1
    slack = ours / peft * (0.05 / ours + 0.05 / peft) + 0.005  # what that rounding can move the ratio, + its own
    assert float(rows["ours:4"][5]) == pytest.approx(ours / peft, abs=slack)
    assert "- rank 4: ours `ours:4`" in text


def test_parity_counts_match_the_closed_form_and_catch_a_target_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    counts = lora.check_parity(lora.TINY, [64, 4, 4], peft=True)
    assert counts == {4: tiny_lora_params(4), 64: tiny_lora_params(64)}
    monkeypatch.setattr(lora_models, "PEFT_TARGETS", ["to_q", "to_k", "to_v"])  # out projections forgotten
    with pytest.raises(RuntimeError, match="rank 4: ours trains .* in 56 layers, PEFT .* in 42: the targets differ"):
        lora.check_parity(lora.TINY, [4], peft=True)


def test_rows_compare_with_their_own_kind() -> None:
    """× PEFT: the fastest PEFT row of the same rank, compiled or not, and base dtype; × full: the full row with
    the same features; the goal line: the fastest of each at a rank."""
    rows = {"full": 10.0, "ours:16": 30.0, "peft:16": 20.0, "peft:16+cl+compile": 40.0,
            "ours:16+cl+compile+ro+cudnn_sdpa": 60.0, "ours:16+bf16base": 33.0, "peft:16+bf16base": 30.0}
    results = {lora.parse_variant(v): {"img_s": s, "peak_gib": s / 10, "warmup_s": 1.0, "trainable": 1e6, "note": ""}
               for v, s in rows.items()}
    table = {line.split(" | ")[0][2:]: line.split(" | ") for line in lora.table(results).splitlines()[2:]}
    assert table["ours:16"][4:8] == ["3.00", "1.50", "3.0", "1.50"]
    assert table["ours:16+cl+compile+ro+cudnn_sdpa"][4:6] == ["–", "1.50"]
    assert table["ours:16+bf16base"][5] == "1.10" and table["peft:16"][4:6] == ["2.00", "–"]
    assert lora.goal_lines(results) == [
        ("- rank 16: ours `ours:16+cl+compile+ro+cudnn_sdpa` 60.0 img/s against PEFT `peft:16+cl+compile` 40.0: "
         "**1.50×**, peak memory 1.50× — goal ≥ 1.3× at no more memory not met")]
    cpu = {v: {**r, "peak_gib": math.nan} for v, r in results.items()}  # no peak counter on the CPU
    assert lora.goal_lines(cpu)[0].endswith("peak memory –× — goal ≥ 1.3× at no more memory met")


def test_variant_names_are_checked_before_any_work(capsys: pytest.CaptureFixture) -> None:
    assert all(lora.parse_variant(v) for v in lora.DEFAULT_VARIANTS)
    for bad in ("ours", "full:4", "peft:0", "ours:16+ro", "ours:16+regional", "full+bf16base"):
        with pytest.raises(ValueError, match=r"full \| ours:<rank> \| peft:<rank>, then \+features from"):
            lora.parse_variant(bad)
    with pytest.raises(SystemExit):
        gpu.main(["--help"])
    assert "--parts lora" in capsys.readouterr().out and gpu.lora_part.__module__ == "ldmlab.bench.gpu"


def test_a_compile_that_would_pass_the_budget_is_left_out(capsys: pytest.CaptureFixture) -> None:
    text = lora.run(["ours:4+compile", "ours:4"], lora.TINY, 64, 2, 1, budget_s=0.0)
    assert "lora ours:4+compile: left out, a compile (≈ 220 s) would pass --budget-s" in capsys.readouterr().out
    assert "| ours:4+compile |" not in text and "| ours:4 | 4 |" in text
