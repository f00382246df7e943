"""KID, Inception Score and CLIP score as functions of features / logits / embeddings, in float64.

torchmetrics' KernelInceptionDistance and InceptionScore are Metrics that run the feature network themselves,
keep features in their dtype and permute with the unseeded global RNG; here one network pass feeds every metric,
so these take the features and subsample with a seeded generator. The MMD estimator is the same as torchmetrics'
(`torchmetrics.image.kid.poly_mmd`, not public API, whose import pulls all of `torchmetrics.image`, ~4 s);
the tests check both against it and against numpy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldmlab.metrics.distributed import all_reduce_sum


def polynomial_mmd(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD² between feature sets with k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018, the KID estimator)."""
    x, y = x.detach().double(), y.detach().double().to(x.device)
    m, d = x.shape[0], x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    # unbiased: the diagonals k(x_i, x_i) of the within-set terms are left out; k_xy keeps all m² pairs
    within = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m**2)


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std of the unbiased polynomial MMD² over random subsets.

    Each subset draws min(subset_size, n_real, n_fake) rows of each set without replacement (torch-fidelity /
    clean-fid draw the same way), from a generator seeded with `seed`: the same features give the same KID.
    The std is the population std (ddof=0), as torch-fidelity and torchmetrics report it.
    """
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 real and 2 generated feature rows, got {real.shape[0]} real and "
                         f"{fake.shape[0]} generated")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        i = torch.randperm(real.shape[0], generator=gen)[:m].to(real.device)
        j = torch.randperm(fake.shape[0], generator=gen)[:m].to(fake.device)
        scores.append(polynomial_mmd(real[i], fake[j].to(real.device)))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(correction=0))


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) ‖ p(y)) per split, mean and std over splits.

    p(y) is the marginal within each split, as in the reference code (improved-gan `inception_score.py`), and
    the std is numpy's (ddof=0) as there. Splits are the rows in order (`tensor_split`); generated samples come
    in random order already, so unlike torchmetrics nothing is permuted and the score is deterministic.
    """
    if logits.shape[0] < splits:
        raise ValueError(f"Inception Score: {logits.shape[0]} samples cannot fill {splits} splits")
    log_p = logits.detach().double().log_softmax(dim=1)  # log p(y|x), (N, C)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = part.exp().mean(0).log()  # log p(y) of this split, (C,)
        kl = (part.exp() * (part - log_marginal)).sum(1)  # KL(p(y|x) ‖ p(y)), (n,)
        scores.append(kl.mean().exp())
    t = torch.stack(scores)
    return float(t.mean()), float(t.std(correction=0))


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Per-pair CLIP score 100 · max(cos(image, text), 0) (Hessel et al. 2021 with torchmetrics' weight 100)."""
    img = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    return 100 * (img * txt).sum(-1).clamp_min(0)  # Hessel et al. use w = 2.5; torchmetrics CLIPScore uses 100


class ClipScore:
    """Mean CLIP score over all pairs seen on all ranks: float64 sum and count, summed over ranks in compute()."""

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def update(self, image_embeds: Tensor, text_embeds: Tensor) -> None:
        """Add a batch of (B, E) image and text embeddings, paired by row."""
        self.total += clip_score(image_embeds, text_embeds).sum().cpu()
        self.count += image_embeds.shape[0]

    def compute(self) -> float:
        """The mean score over every rank's pairs (a collective: every rank calls it)."""
        total = all_reduce_sum(torch.stack([self.total, torch.tensor(float(self.count), dtype=torch.float64)]))
        if total[1] == 0:
            raise ValueError("ClipScore: no image/text pairs were added")
        return float(total[0] / total[1])

    def reset(self) -> None:
        """Forget all pairs."""
        self.total.zero_()
        self.count = 0
