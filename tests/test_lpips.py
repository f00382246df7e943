"""LPIPS: torchvision key layout, checkpoint loading, distance properties, frozen eval-mode module."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import ldmlab.nn.lpips as lpips_mod
from ldmlab.nn.lpips import LPIPS, LPIPS_CHANNELS, VGG16Features, torchmetrics_heads_path

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS backbone='random'")

# torchvision `vgg16().features` conv indices and (out, in) channels (hard-coded: torchvision is unavailable).
_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
          14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
          28: (512, 512)}
EXPECTED_SHAPES = {}
for _i, (_o, _c) in _CONVS.items():
    EXPECTED_SHAPES[f"features.{_i}.weight"] = (_o, _c, 3, 3)
    EXPECTED_SHAPES[f"features.{_i}.bias"] = (_o,)


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(backbone="random")


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def test_vgg16_keys_match_torchvision() -> None:
    sd = VGG16Features().state_dict()
    assert len(EXPECTED_SHAPES) == 26
    assert list(sd.keys()) == list(EXPECTED_SHAPES)
    assert {k: tuple(v.shape) for k, v in sd.items()} == EXPECTED_SHAPES


def test_vgg16_taps_relu_outputs() -> None:
    feats = VGG16Features()(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == list(LPIPS_CHANNELS)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # relu5_3 is before the 5th pool
    assert all(bool((f >= 0).all()) for f in feats)  # taps are after ReLU


def test_loads_torchvision_format_file(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(s, generator=g) for k, s in EXPECTED_SHAPES.items()}
    state["classifier.0.weight"] = torch.randn(8, 4)  # extra keys of the real file must be ignored
    state["classifier.0.bias"] = torch.randn(8)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    loaded = LPIPS(backbone=path).net.state_dict()
    assert set(loaded) == set(EXPECTED_SHAPES)
    for k in EXPECTED_SHAPES:
        assert torch.equal(loaded[k], state[k]), k


def test_missing_backbone_raises_with_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as info:
        LPIPS(backbone=missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_random_backbone_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lpips_mod, "_random_warned", False)
    with pytest.warns(UserWarning, match="not perceptual"):
        LPIPS(backbone="random")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LPIPS(backbone="random")  # second instance: silent


def test_heads_equal_torchmetrics_file(lpips: LPIPS) -> None:
    ref = torch.load(torchmetrics_heads_path(), map_location="cpu", weights_only=True)
    for i, head in enumerate(lpips.heads):
        assert head.bias is None
        assert torch.equal(head.weight, ref[f"lin{i}.model.1.weight"])


def test_identical_images_zero(lpips: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = images
    d = lpips(x, x.clone())
    assert d.shape == (2,)
    assert torch.equal(d, torch.zeros(2))


def test_positive_and_symmetric(lpips: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    dxy, dyx = lpips(x, y), lpips(y, x)
    assert (dxy > 0).all()
    torch.testing.assert_close(dxy, dyx)


def test_frozen_and_stays_eval(lpips: LPIPS) -> None:
    assert all(not p.requires_grad for p in lpips.parameters())
    wrapper = torch.nn.Sequential(lpips)
    wrapper.train()
    assert wrapper.training and not lpips.training
    assert not any(m.training for m in lpips.modules())


def test_gradient_flows_to_input(lpips: LPIPS, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    x = x.clone().requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
