"""VAE losses against hand-computed values and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldmlab.losses.vae import (
    D_LOSSES,
    adaptive_weight,
    disc_factor,
    generator_loss,
    get_d_loss,
    hinge_d_loss,
    kl_loss,
    l1,
    l2,
    nll_with_learned_logvar,
    reconstruction_loss,
    vanilla_d_loss,
)

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.0])


def test_l1_l2_elementwise() -> None:
    x, y = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(l1(x, y), torch.tensor([0.5, 3.0]))
    assert torch.equal(l2(x, y), torch.tensor([0.25, 9.0]))


def test_hinge_by_hand() -> None:
    # relu(1 - real) = [0, .5, 2] → mean 5/6 ; relu(1 + fake) = [0, 1, 2] → mean 1
    expected = 0.5 * (2.5 / 3 + 3.0 / 3)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(expected, abs=1e-6)


def test_vanilla_by_hand() -> None:
    sp = lambda v: math.log1p(math.exp(v))
    expected = 0.5 * (sum(sp(-r) for r in REAL.tolist()) / 3 + sum(sp(f) for f in FAKE.tolist()) / 3)
    assert vanilla_d_loss(REAL, FAKE).item() == pytest.approx(expected, abs=1e-6)


def test_generator_loss() -> None:
    assert generator_loss(torch.tensor([[1.0, 3.0], [-2.0, 2.0]])).item() == pytest.approx(-1.0)


def test_get_d_loss_registry() -> None:
    assert get_d_loss("hinge") is hinge_d_loss and get_d_loss("vanilla") is vanilla_d_loss
    assert set(D_LOSSES) == {"hinge", "vanilla"}
    with pytest.raises(ValueError, match="hinge, vanilla") as info:
        get_d_loss("wasserstein")
    assert "wasserstein" in str(info.value)


def test_adaptive_weight_closed_form() -> None:
    # nll = a·Σw, g = b·Σw → ∇nll = a·1, ∇g = b·1 → weight = |a|√n / (|b|√n + eps)
    w = torch.randn(2, 2, requires_grad=True)
    a, b, eps = -3.0, 0.5, 1e-4
    n = math.sqrt(w.numel())
    weight = adaptive_weight(a * w.sum(), b * w.sum(), w, eps=eps)
    assert weight.item() == pytest.approx(abs(a) * n / (abs(b) * n + eps), rel=1e-6)
    assert not weight.requires_grad


def test_adaptive_weight_clamps_and_keeps_graph() -> None:
    w = torch.ones(3, requires_grad=True)
    nll, g = 1e6 * w.sum(), 1e-3 * w.sum()
    assert adaptive_weight(nll, g, w).item() == pytest.approx(1e4)
    assert adaptive_weight(nll, g, w, max_weight=7.0).item() == pytest.approx(7.0)
    (nll + g).backward()  # graph was retained for the caller's backward
    assert torch.allclose(w.grad, torch.full((3,), 1e6 + 1e-3))


def test_disc_factor_gating() -> None:
    assert disc_factor(49_999, start=50_001) == 0.0
    assert disc_factor(50_001, start=50_001) == 1.0
    assert disc_factor(60_000, start=50_001, factor=0.5) == 0.5


def test_nll_logvar_zero_is_sum_over_batch() -> None:
    rec = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(nll_with_learned_logvar(rec, torch.zeros(())), rec.sum() / 4)


def test_nll_logvar_and_weights() -> None:
    rec, logvar = torch.full((2, 1, 2, 2), 2.0), torch.tensor(math.log(2.0))
    # each element 2/2 + log 2; 8 elements summed, divided by B = 2
    expected = 8 * (1 + math.log(2.0)) / 2
    assert nll_with_learned_logvar(rec, logvar).item() == pytest.approx(expected, rel=1e-6)
    weights = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    assert nll_with_learned_logvar(rec, logvar, weights).item() == pytest.approx(expected / 2, rel=1e-6)


def test_kl_loss_mean_over_batch() -> None:
    assert kl_loss(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(3.0)


def test_reconstruction_loss_broadcasts_per_sample() -> None:
    x, y = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # W == B: a bare (B,) would broadcast wrongly
    rec = reconstruction_loss(x, y, torch.tensor([0.0, 10.0]), perceptual_weight=0.5)
    assert torch.equal(rec[0], torch.ones(1, 2, 2)) and torch.equal(rec[1], torch.full((1, 2, 2), 6.0))
    assert torch.equal(reconstruction_loss(x, y), torch.ones(2, 1, 2, 2))
