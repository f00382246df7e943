"""KL-VAE training losses as pure functions of tensors.

Sources: LDM `ldm/modules/losses/contperceptual.py` (`LPIPSWithDiscriminator`) and taming-transformers
`taming/modules/losses/vqperceptual.py` (`hinge_d_loss`, `vanilla_d_loss`, `adopt_weight`,
`calculate_adaptive_weight`). Unlike LDM, no loss here owns a network or branches on `optimizer_idx`:
the LightningModule composes these in its generator and discriminator steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- reconstruction / likelihood


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Elementwise |x − y| (LDM contperceptual: `torch.abs(inputs - reconstructions)`)."""
    return torch.abs(x - y)


def l2(x: Tensor, y: Tensor) -> Tensor:
    """Elementwise (x − y)² (taming vqperceptual's `l2` pixel loss option)."""
    return (x - y) ** 2


PIXEL_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"l1": l1, "l2": l2}


def get_pixel_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Pixel reconstruction loss by name (`model.loss.rec_loss` in the VAE's config)."""
    if name not in PIXEL_LOSSES:
        raise ValueError(f"unknown rec_loss {name!r}; valid: {', '.join(sorted(PIXEL_LOSSES))}")
    return PIXEL_LOSSES[name]


def reconstruction_loss(x: Tensor, x_rec: Tensor, perceptual: Tensor | None = None,
                        perceptual_weight: float = 1.0, pixel_loss: str = "l1") -> Tensor:
    """Elementwise |x − x̂| + w·LPIPS(x, x̂) with the (B,) distance broadcast per sample (LDM contperceptual)."""
    rec = get_pixel_loss(pixel_loss)(x, x_rec)
    if perceptual is not None and perceptual_weight > 0:
        # view as (B,1,1,1): a bare (B,) would broadcast against the width axis instead of the batch axis
        rec = rec + perceptual_weight * perceptual.reshape(-1, *([1] * (rec.dim() - 1)))
    return rec


def nll_with_learned_logvar(rec: Tensor, logvar: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ(rec/exp(logvar) + logvar) / B: Laplace NLL with a learned scalar log-variance (LDM contperceptual).

    Reduction: summed over every non-batch element, then divided by the batch size (LDM's
    `torch.sum(nll) / nll.shape[0]`), so its scale grows with H·W·C. `weights` (broadcastable to `rec`)
    multiplies elementwise before the sum; LDM feeds the *unweighted* nll to `adaptive_weight`.
    """
    nll = rec / torch.exp(logvar) + logvar
    if weights is not None:
        nll = weights * nll
    return torch.sum(nll) / nll.shape[0]


def kl_loss(kl_per_sample: Tensor) -> Tensor:
    """Mean over the batch of the per-sample KL (already summed over latent dims): LDM `sum(kl) / B`."""
    return torch.sum(kl_per_sample) / kl_per_sample.shape[0]


# ---------------------------------------------------------------- adversarial


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss ½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) (taming vqperceptual)."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating BCE discriminator loss ½(E[softplus(−D(x))] + E[softplus(D(x̂))]) (taming vqperceptual)."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def generator_loss(logits_fake: Tensor) -> Tensor:
    """Generator adversarial loss −E[D(x̂)] (LDM contperceptual / taming vqperceptual, for both D losses)."""
    return -torch.mean(logits_fake)


D_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def get_d_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Discriminator loss by name (LDM config `disc_loss`)."""
    if name not in D_LOSSES:
        raise ValueError(f"unknown discriminator loss {name!r}; valid: {', '.join(sorted(D_LOSSES))}")
    return D_LOSSES[name]


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4,
                    eps: float = 1e-4) -> Tensor:
    """‖∇_L nll‖ / (‖∇_L g‖ + eps), clamped to [0, max_weight], detached (VQGAN Eq. 7; taming/LDM).

    `last_layer` is the decoder's final conv weight. Both grads keep the graph (retain_graph=True) so the
    caller can still backpropagate the total loss. Multiply by `disc_weight` (0.5 in LDM) outside.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad) / (torch.norm(g_grad) + eps)
    return torch.clamp(weight, 0.0, max_weight).detach()


def disc_factor(global_step: int, start: int, factor: float = 1.0) -> float:
    """`factor` once global_step ≥ start, else 0 (taming `adopt_weight`): gates the GAN terms until disc_start."""
    return factor if global_step >= start else 0.0
