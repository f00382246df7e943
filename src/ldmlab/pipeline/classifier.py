"""The demo's judge: a small CNN trained on the REAL train crops, scored on held-out crops, then used to ask
"is a generated sample of class c classified as c?" (class accuracy, the demo's conditional-fidelity number).

The network is `ldmlab.nn.classifier.SmallCNN`; the loop is plain torch (it is tiny: no Trainer needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ldmlab.data.module import ShardDataModule
from ldmlab.data.tarstream import shard_samples
from ldmlab.data.transforms import normalize, to_batch
from ldmlab.nn.classifier import SmallCNN


def load_split(dm: ShardDataModule, split: str) -> tuple[Tensor, Tensor]:
    """Every crop of a split, deterministically decoded: (N, H, W, 3) uint8 pixels and (N,) int64 labels.

    uint8 keeps 5000 crops of 128 px at 250 MB instead of 1 GB; batches are normalised when used.
    """
    urls = [u for source in dm.train_sources() for u in source] if split == "train" else dm.val_url_list()
    if not urls:
        raise ValueError(f"the data config has no {split} shards to train or score the classifier on")
    decode = dm.make_decoder(train=False)
    if decode.bucket_sizes is not None:  # the judge sees image_size² centre crops, whatever the buckets
        decode = decode.with_buckets(None)
    items = [decode(sample, None) for url in urls for sample in shard_samples(url)]
    pixels, labels = [i[0] for i in items], [i[1] for i in items]
    return to_batch(pixels, uint8=True).clone(), torch.tensor(labels, dtype=torch.int64)


def class_accuracy(predicted: Tensor, target: Tensor, num_classes: int) -> dict:
    """{"accuracy": fraction predicted == target, "per_class": [fraction for each target class, None if absent]}."""
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    correct = (predicted == target).float()
    per_class = []
    for c in range(num_classes):
        mask = target == c
        per_class.append(float(correct[mask].mean()) if mask.any() else None)
    return {"accuracy": float(correct.mean()) if len(correct) else math.nan, "per_class": per_class}


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16/fp16 autocast on CUDA when the trainer config asks for it (same rule as Lightning's precision)."""
    if device.type != "cuda" or not precision.startswith(("bf16", "16")):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, kernel radius ⌈2σ⌉, reflect padding."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1)[:, None]  # (C, 1, K): one depthwise kernel per channel
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[..., None, :], groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[..., :, None], groups=x.shape[1])


def _augment(x: Tensor, generator: torch.Generator, blur: float) -> Tensor:
    """Random horizontal flips, and a Gaussian blur (σ uniform in [0.3, blur]) on a random half of the batch.

    Every generated image passes through the VAE decoder, which loses fine texture; a judge that never saw a
    soft image would score decoder blur, not class identity (its accuracy on VAE reconstructions shows this).
    """
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if blur <= 0:
        return x
    sigma = 0.3 + (blur - 0.3) * float(torch.rand((), generator=generator))
    soft = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(soft, gaussian_blur(x, sigma), x)


def train_classifier(pixels: Tensor, labels: Tensor, num_classes: int, *, epochs: int = 10, batch_size: int = 128,
                     lr: float = 2e-3, width: int = 32, depth: int = 3, blur: float = 1.0, seed: int = 0,
                     device: torch.device | str = "cpu", precision: str = "32-true") -> SmallCNN:
    """SmallCNN trained with AdamW + one-cycle LR for a fixed number of epochs (no early stopping on val)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = SmallCNN(num_classes, width=width, depth=depth).to(device)
    steps_per_epoch = max(1, len(pixels) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(pixels), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = _augment(normalize(pixels[idx].to(device)), g, blur)
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 256, precision: str = "32-true") -> Tensor:
    """Predicted classes (N,) of images: (N, 3, H, W) float in [-1, 1] or (N, H, W, 3) uint8 pixels."""
    device = next(model.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        x = normalize(chunk.to(device)) if chunk.dtype == torch.uint8 else chunk.to(device).float()
        with autocast(device, precision):
            out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def sample_labels(num_classes: int, per_class: int) -> list[int]:
    """Conditioning labels of a one-row-per-class grid: 0,0,…,1,1,…, each class `per_class` times."""
    return [c for c in range(num_classes) for _ in range(per_class)]


def format_per_class(per_class: Sequence[float | None], names: Sequence[str]) -> str:
    """`name 0.93, name 0.88, ...` for logs."""
    return ", ".join(f"{n} {'n/a' if a is None else f'{a:.2f}'}" for n, a in zip(names, per_class))
