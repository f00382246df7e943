"""CFG condition dropout: one seeded function for labels and embeddings."""

from __future__ import annotations

import torch

from ldmlab.diffusion.conditioning import drop_condition
from ldmlab.lit.conditioning import ClassConditioner


def test_labels_dropped_at_rate_and_reproducibly() -> None:
    labels = torch.arange(20000) % 7
    out_a = drop_condition(labels, torch.tensor(7), 0.1, torch.Generator().manual_seed(3))
    out_b = drop_condition(labels, torch.tensor(7), 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(out_a, out_b)
    dropped = out_a == 7
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out_a[~dropped], labels[~dropped])


def test_zero_probability_is_identity_and_embeddings_drop_whole_rows() -> None:
    ctx = torch.randn(64, 5, 8)
    null = torch.zeros(5, 8)
    assert drop_condition(ctx, null, 0.0) is ctx
    out = drop_condition(ctx, null, 0.5, torch.Generator().manual_seed(0))
    rows_null = (out == 0).flatten(1).all(1)
    rows_kept = (out == ctx).flatten(1).all(1)
    assert bool((rows_null | rows_kept).all()) and 0 < int(rows_null.sum()) < 64


def test_class_conditioner_null_and_range_check() -> None:
    cond = ClassConditioner(num_classes=10)
    assert cond.unconditional(3, torch.device("cpu"))["class_labels"].tolist() == [10, 10, 10]
    try:
        cond({"label": torch.tensor([3, 10])})
    except ValueError as err:
        assert "num_classes" in str(err)
    else:
        raise AssertionError("label 10 of 10 classes was accepted")
