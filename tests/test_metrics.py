"""ldmlab.metrics against closed forms (Gaussians, uniform/one-hot logits, hand-checkable k-NN balls), scipy's
sqrtm, a pytorch-fid style numpy formula, direct numpy MMD, and torchmetrics' FID/KID/IS with identity features."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from ldmlab.metrics import (
    ClipScore,
    FeatureStatistics,
    MetricOptions,
    SampleMetrics,
    StatsKey,
    check_sample_count,
    clip_score,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    min_samples_fd,
    polynomial_mmd,
    precision_recall,
    reference_statistics,
    sqrtm_psd,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "ldmlab" / "metrics"


class StandIn(nn.Module):
    """A tiny fixed feature network with the FeatureNetwork interface: 4×4 pooled pixels → linear features."""

    has_logits = True

    def __init__(self, num_features: int = 6, num_classes: int = 5, name: str = "stand-in") -> None:
        super().__init__()
        self.name, self.num_features = name, num_features
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(48, num_features, generator=gen))
        self.head = nn.Parameter(torch.randn(num_features, num_classes, generator=gen))

    def forward(self, images: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.proj  # (B, D)

    def logits(self, images: Tensor) -> Tensor:
        return self.forward(images) @ self.head  # (B, C)


class Identity(nn.Identity):
    """torchmetrics' custom-feature path with the features passed in as the "images"."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def gaussian_pair(dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """μ1, Σ1, μ2, Σ2 with commuting covariances (one eigenbasis Q) and their closed-form FD."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    a, b = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.1, torch.rand(dim, generator=gen,
                                                                                dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen,
                                                                                dtype=torch.float64)
    # FD = ‖μ1 − μ2‖² + Σᵢ (√aᵢ − √bᵢ)² when Σ1 = Q diag(a) Qᵀ and Σ2 = Q diag(b) Qᵀ
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    return mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, expected


def pytorch_fid_formula(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm of the non-symmetric product)."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2)).real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---- Fréchet distance ----

def test_fd_closed_form_diagonal() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, -1.0])
    sd1, sd2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = 1 + 0 + 9 + (2**2 + 0 + 1)  # ‖μ1 − μ2‖² + Σ(σ1 − σ2)²
    assert frechet_distance(mu1, torch.diag(sd1**2), mu2, torch.diag(sd2**2)) == pytest.approx(expected, abs=1e-12)
    assert frechet_distance(mu1, torch.diag(sd1**2), mu1, torch.diag(sd1**2)) == pytest.approx(0, abs=1e-12)


def test_fd_closed_form_commuting_covariances() -> None:
    mu1, s1, mu2, s2, expected = gaussian_pair(16)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_fd_from_samples_converges() -> None:
    mu1, s1, _, s2, expected = gaussian_pair(4, seed=1)
    mu2 = mu1 + torch.tensor([0.3, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = 0.09 + expected - float((mu1 - _).square().sum())  # ‖Δμ‖² + the covariance term: 0.09 + 0.33
    gen = torch.Generator().manual_seed(2)
    stats = []
    for mu, s in ((mu1, s1), (mu2, s2)):
        st = FeatureStatistics(4, "gauss")
        chol = torch.linalg.cholesky(s)
        for _ in range(20):  # 200k samples in batches, as a feature network would deliver them
            st.update((mu + torch.randn(10_000, 4, generator=gen, dtype=torch.float64) @ chol.T).float())
        stats.append(st)
    fd = frechet_distance(stats[0].mean, stats[0].covariance, stats[1].mean, stats[1].covariance)
    assert fd == pytest.approx(expected, rel=2e-3), (fd, expected)


def test_sqrtm_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for rank in (24, 10):  # full rank and singular (PSD of rank 10 in 24 dims)
        a = rng.standard_normal((24, rank))
        spd = a @ a.T + (1e-3 * np.eye(24) if rank == 24 else 0)
        root = sqrtm_psd(spd).numpy()
        ref = scipy.linalg.sqrtm(spd).real
        np.testing.assert_allclose(root, ref, atol=1e-6 if rank < 24 else 1e-9)
        np.testing.assert_allclose(root @ root, spd, atol=1e-9)


def test_fd_matches_pytorch_fid_formula() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((200, 16)), rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16)) + 0.5
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(pytorch_fid_formula(*args), rel=1e-9)


def test_statistics_match_numpy_and_torchmetrics_fid() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(50, 8, generator=gen), torch.randn(40, 8, generator=gen) * 1.5 + 0.3
    tm = FrechetInceptionDistance(feature=Identity(8))
    ours = [FeatureStatistics(8, "identity"), FeatureStatistics(8, "identity")]
    for part in real.split(7):
        tm.update(part, real=True)
        ours[0].update(part)
    for part in fake.split(9):
        tm.update(part, real=False)
        ours[1].update(part)
    np.testing.assert_allclose(ours[0].mean.numpy(), real.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(ours[1].covariance.numpy(), np.cov(fake.double().numpy(), rowvar=False), atol=1e-12)
    fd = frechet_distance(ours[0].mean, ours[0].covariance, ours[1].mean, ours[1].covariance)
    assert fd == pytest.approx(float(tm.compute()), rel=1e-5)  # torchmetrics returns float32


def test_min_samples_line() -> None:
    assert min_samples_fd(2048) == 2049
    check_sample_count(2049, 2048)
    with pytest.raises(ValueError, match=r"FD needs at least 2049 samples for 2048 features.*set n=2049") as e:
        check_sample_count(1000, 2048)
    assert "\n" not in str(e.value)


# ---- FeatureStatistics: files and metadata ----

def test_statistics_save_load_round_trip(tmp_path: Path) -> None:
    st = FeatureStatistics(5, "inception-v3-fid", 256, "imagenet-val")
    st.update(torch.randn(13, 5))
    st.save(tmp_path / "ref.safetensors")
    back = FeatureStatistics.load(tmp_path / "ref.safetensors")
    assert (back.network, back.resolution, back.source, back.count) == ("inception-v3-fid", 256, "imagenet-val", 13)
    assert torch.equal(back.sum, st.sum) and torch.equal(back.outer, st.outer)
    assert back.origin == str(tmp_path / "ref.safetensors")
    none_res = FeatureStatistics(5, "x")
    none_res.save(tmp_path / "n.safetensors")
    assert FeatureStatistics.load(tmp_path / "n.safetensors").resolution is None
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ldmlab feature statistics file"):
        FeatureStatistics.load(tmp_path / "other.safetensors")


def test_check_compatible_one_line_names_both(tmp_path: Path) -> None:
    st = FeatureStatistics(2048, "inception-v3-fid", 256, "ffhq")
    st.save(tmp_path / "ref.safetensors")
    ref = FeatureStatistics.load(tmp_path / "ref.safetensors")
    ref.check_compatible(StatsKey("inception-v3-fid", 2048, 256), "eval")
    ref.check_compatible(StatsKey("inception-v3-fid", 2048, None), "eval")  # resolution not known: not checked
    for key, words in ((StatsKey("vae-encoder", 16, 256), ("vae-encoder", "inception-v3-fid")),
                       (StatsKey("inception-v3-fid", 2048, 512), ("512 px", "256 px"))):
        with pytest.raises(ValueError) as e:
            ref.check_compatible(key, "callbacks.sample_metrics")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("callbacks.sample_metrics:")
        assert all(w in msg for w in words) and "delete" in msg and "ref.safetensors" in msg, msg
    with pytest.raises(ValueError, match="recompute the reference statistics"):  # in memory: no file to delete
        FeatureStatistics(4, "a").check_compatible(FeatureStatistics(4, "b"), "eval")


# ---- KID ----

def numpy_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³ written out over index pairs (Bińkowski et al. 2018)."""
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return float(xx + yy - 2 * xy)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_numpy_and_torchmetrics() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 7, generator=gen), torch.randn(30, 7, generator=gen) + 0.4
    expected = numpy_mmd(x.double().numpy(), y.double().numpy())
    assert polynomial_mmd(x, y) == pytest.approx(expected, rel=1e-12)
    # subsets of all 30 rows are permutations of the whole sets: the estimator is permutation-invariant
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    tm = KernelInceptionDistance(feature=Identity(7), subsets=3, subset_size=30)
    tm.update(x.double(), real=True)
    tm.update(y.double(), real=False)
    assert float(tm.compute()[0]) == pytest.approx(expected, rel=1e-9)


def test_kid_same_vs_shifted_and_seeded() -> None:
    gen = torch.Generator().manual_seed(5)
    real, same, shifted = (torch.randn(600, 16, generator=gen) for _ in range(3))
    kid_same, std_same = kernel_inception_distance(real, same, subsets=20, subset_size=200)
    kid_shift, _ = kernel_inception_distance(real, shifted + 0.5, subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * std_same + 1e-3 and abs(kid_same) < 0.01
    assert kid_shift > 0.5 and kid_shift > 10 * std_same
    assert kernel_inception_distance(real, same, 5, 100, seed=1) == kernel_inception_distance(real, same, 5, 100,
                                                                                              seed=1)
    assert kernel_inception_distance(real, same, 5, 100, seed=1) != kernel_inception_distance(real, same, 5, 100,
                                                                                              seed=2)


# ---- Inception Score ----

def test_inception_score_closed_forms() -> None:
    mean, std = inception_score(torch.zeros(40, 10), splits=4)  # p(y|x) uniform: KL = 0
    assert (mean, std) == (pytest.approx(1.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    confident = 100 * nn.functional.one_hot(torch.arange(60) % 6, 6).float()  # one class each, evenly spread
    mean, std = inception_score(confident, splits=5)  # KL = log C per sample, IS = C
    assert mean == pytest.approx(6.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="cannot fill 10 splits"):
        inception_score(torch.zeros(4, 3))


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save", "ignore:std\\(\\)")
def test_inception_score_matches_torchmetrics() -> None:
    from torchmetrics.image.inception import InceptionScore

    logits = torch.randn(64, 9, generator=torch.Generator().manual_seed(6)) * 3
    tm = InceptionScore(feature=Identity(9), splits=1)  # one split: its random permutation does not matter
    tm.update(logits.double())
    assert inception_score(logits, splits=1)[0] == pytest.approx(float(tm.compute()[0]), rel=1e-9)


# ---- precision / recall ----

def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 written out: pairwise distances, k-th neighbour radii, any-ball membership."""
    def cover(manifold: np.ndarray, queries: np.ndarray) -> float:
        d_mm = np.linalg.norm(manifold[:, None] - manifold[None], axis=-1)
        radii = np.sort(d_mm, axis=1)[:, k]  # column 0 is the point itself
        d_qm = np.linalg.norm(queries[:, None] - manifold[None], axis=-1)
        return float((d_qm <= radii[None]).any(1).mean())
    return cover(real, fake), cover(fake, real)


def test_precision_recall_hand_example() -> None:
    # real on a line at 0, 1, 2, 3, 20, 21: every 1-NN radius is 1. fake at 0.5, 2.9, 5, 6: radii 2.4, 2.1, 1, 1.
    # precision: 0.5 and 2.9 lie in real balls, 5 and 6 do not → 1/2. recall: 0..3 lie in fake balls, 20 and 21
    # (14 from the nearest fake, whose radius is 1) do not → 4/6.
    line = lambda xs: torch.tensor([[x, 0.0] for x in xs])
    real, fake = line([0, 1, 2, 3, 20, 21]), line([0.5, 2.9, 5, 6])
    assert precision_recall(real, fake, k=1, block=2) == (pytest.approx(0.5), pytest.approx(4 / 6))


def test_precision_recall_limits_and_brute_force() -> None:
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(300, 8, generator=gen)
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100, k=3) == (0.0, 0.0)
    fake = torch.randn(200, 8, generator=gen) * 1.3 + 0.4
    got = precision_recall(real.double(), fake.double(), k=3, block=64)
    assert got == pytest.approx(brute_force_pr(real.double().numpy(), fake.double().numpy(), 3), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


# ---- CLIP score ----

def test_clip_score_closed_forms_and_mean() -> None:
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 3.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 0.0]])
    expected = torch.tensor([100.0, 0.0, 0.0, 100 / 2**0.5], dtype=torch.float64)  # max(cos, 0) · 100
    torch.testing.assert_close(clip_score(img, txt), expected)
    acc = ClipScore()
    acc.update(img[:1], txt[:1])
    acc.update(img[1:], txt[1:])
    assert acc.compute() == pytest.approx(float(expected.mean()))


# ---- SampleMetrics: one pass, refusals before sampling ----

def images(n: int, seed: int, res: int = 8, shift: float = 0.0) -> Tensor:
    return (torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1 + shift).clamp(-1, 1)


def test_sample_metrics_end_to_end() -> None:
    net = StandIn()
    ref, ref_feats = reference_statistics(net, images(40, 0).split(16), source="test-real")
    assert (ref.count, ref.resolution, ref.network, ref_feats.shape) == (40, 8, "stand-in", (40, 6))
    sm = SampleMetrics(net, ref, ref_feats, resolution=8, num_samples=30,
                       options=MetricOptions(kid_subsets=5, kid_subset_size=20, is_splits=3))
    for batch in images(30, 1).split(7):
        sm.update(batch)
    out = sm.compute()
    assert set(out) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    fake_feats = net(images(30, 1))
    fake = FeatureStatistics(6, "stand-in")
    fake.update(fake_feats)
    assert out["fid"] == pytest.approx(frechet_distance(ref.mean, ref.covariance, fake.mean, fake.covariance))
    assert (out["precision"], out["recall"]) == precision_recall(ref_feats, fake_feats)
    assert out["is"] == pytest.approx(inception_score(net.logits(images(30, 1)), 3)[0])
    sm.reset()
    for batch in images(30, 2, shift=0.6).split(10):  # brighter: further from the reference
        sm.update(batch)
    assert sm.compute()["fid"] > out["fid"]


def test_sample_metrics_refuses_before_sampling(tmp_path: Path) -> None:
    net = StandIn()
    ref, feats = reference_statistics(net, [images(20, 0)], source="test-real")
    ref.save(tmp_path / "ref.safetensors")
    ref = FeatureStatistics.load(tmp_path / "ref.safetensors")
    cases = [
        ({"network": StandIn(name="other-net")}, "other-net"),
        ({"resolution": 16}, "16 px"),
        ({"num_samples": 5}, "FD needs at least 7 samples for 6 features"),
        ({"reference_features": None}, "need the reference feature rows"),
        ({"metrics": ("fid", "lpips")}, "unknown metrics"),
    ]
    for kwargs, words in cases:
        args = {"network": net, "reference": ref, "reference_features": feats, "resolution": 8} | kwargs
        with pytest.raises(ValueError, match=words) as e:
            SampleMetrics(**args)
        assert "\n" not in str(e.value)
    no_logits = StandIn()
    no_logits.has_logits = False
    with pytest.raises(ValueError, match="Inception Score needs class logits"):
        SampleMetrics(no_logits, ref, feats)
    tiny, _ = reference_statistics(net, [images(4, 0)], source="tiny", keep_features=False)
    with pytest.raises(ValueError, match="FD needs at least 7 samples .* got 4 reference images"):
        SampleMetrics(net, tiny, metrics=("fid",))
    sm = SampleMetrics(net, ref, feats)  # resolution not given: checked at the first batch
    with pytest.raises(ValueError, match="16 px"):
        sm.update(images(2, 1, res=16))
    sm = SampleMetrics(net, ref, feats, resolution=8)
    with pytest.raises(ValueError, match="generated images of 16 px"):
        sm.update(images(2, 1, res=16))
    with pytest.raises(ValueError, match="images of 16 px after 8 px"):
        reference_statistics(net, [images(2, 0), images(2, 0, res=16)], source="mixed")


# ---- layering ----

FORBIDDEN = {"lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "wandb", "torchvision"}


def test_metrics_import_no_framework() -> None:
    for path in sorted(SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
                if name.startswith("ldmlab."):
                    assert name.startswith(("ldmlab.metrics", "ldmlab.utils")), f"{path.name} imports {name}"
    code = ("import sys, ldmlab.metrics\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
