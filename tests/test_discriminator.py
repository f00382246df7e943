"""PatchGAN discriminator and ActNorm."""

from __future__ import annotations

import pytest
import torch

from ldmlab.nn.discriminator import ActNorm, NLayerDiscriminator


def test_patchgan_output_shape_pix2pix() -> None:
    d = NLayerDiscriminator(in_channels=3, base_channels=64, n_layers=3)
    with torch.no_grad():
        out = d(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 1, 30, 30)  # 256 → 128 → 64 → 32 → 31 → 30 (pix2pix 70×70 PatchGAN)


@pytest.mark.parametrize("norm", ["batch", "actnorm", "group", "none"])
def test_norms_build_and_bias(norm: str) -> None:
    d = NLayerDiscriminator(base_channels=8, n_layers=2, norm=norm)
    out = d(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1, 6, 6)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].bias is not None and convs[-1].bias is not None
    assert all((c.bias is None) == (norm != "none") for c in convs[1:-1])  # no bias before a norm


def test_weights_init_taming() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    w = d.main[2].weight  # 128×64×4×4 conv
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = d.main[3]
    assert abs(bn.weight.mean().item() - 1.0) < 1e-2 and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_invalid_norm_raises() -> None:
    with pytest.raises(ValueError, match="batch, actnorm, group, none"):
        NLayerDiscriminator(norm="instance")


def test_actnorm_data_dependent_init() -> None:
    x = torch.randn(4, 5, 6, 6) * torch.arange(1.0, 6.0).view(1, 5, 1, 1) + 3.0
    an = ActNorm(5)
    y = an(x)
    assert an.initialized.item() == 1
    flat = y.detach().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(5), atol=1e-4, rtol=0)
    loc = an.loc.detach().clone()
    an(x * 2)  # second batch: no re-initialisation
    assert torch.equal(an.loc.detach(), loc)


def test_actnorm_no_init_in_eval() -> None:
    an = ActNorm(3).eval()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(an(x), x) and an.initialized.item() == 0


@pytest.mark.parametrize(("kwargs", "match"), [({"n_layers": 0}, "n_layers=0 must be a positive integer"),
                                               ({"base_channels": 0}, "base_channels=0 must be a positive"),
                                               ({"in_channels": 2.5}, "in_channels=2.5 must be a positive")])
def test_invalid_sizes_raise_one_line(kwargs: dict[str, object], match: str) -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=match) as info:
        NLayerDiscriminator(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
