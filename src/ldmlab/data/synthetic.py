"""Synthetic batches for speed measurements: the training path without storage or decoding in the way.

    python train.py model=unet_sd15 trainer=gpu data=synthetic_latents ...

A fixed pool of random samples (seeded) is cycled, so the loader costs one collate per batch and the numbers
isolate the model, the step and Lightning's loop. Not for learning anything.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class _Pool(Dataset):
    def __init__(self, kind: str, shape: tuple[int, ...], context_shape: tuple[int, ...] | None,
                 num_classes: int | None, pool: int, length: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kind, self.length = kind, length
        if kind == "image":
            self.data = (torch.rand((pool, *shape), generator=g) * 255).to(torch.uint8)
        else:
            self.data = torch.randn((pool, *shape), generator=g)
        self.context = torch.randn((pool, *context_shape), generator=g) if context_shape else None
        self.labels = torch.randint(0, num_classes, (pool,), generator=g) if num_classes else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        i = index % len(self.data)
        key = "image" if self.kind == "image" else "latent"
        sample: dict[str, torch.Tensor | str] = {key: self.data[i], "text": ""}
        if self.context is not None:
            sample["context"] = self.context[i]
        if self.labels is not None:
            sample["label"] = self.labels[i]
        return sample


class SyntheticDataModule(pl.LightningDataModule):
    """Random images (uint8 → [-1, 1] on the device, as data=wds) or raw latents (+ CLIP-shaped `context`,
    + labels) cycled from a pool of `pool` samples; an epoch has `samples_per_epoch` samples, validation
    `val_samples`."""

    def __init__(self, kind: Literal["image", "latent"] = "latent", shape: tuple[int, ...] = (4, 32, 32),
                 context_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 batch_size: int = 64, num_workers: int = 2, pool: int = 256, samples_per_epoch: int = 10**7,
                 val_samples: int = 256, seed: int = 0, pin_memory: bool = True) -> None:
        super().__init__()
        if kind not in ("image", "latent"):
            raise ValueError(f"data.kind={kind!r}: valid are image, latent")
        self.kind, self.batch_size, self.num_workers, self.pin_memory = kind, batch_size, num_workers, pin_memory
        make = partial(_Pool, kind, tuple(shape), tuple(context_shape) if context_shape else None, num_classes, pool)
        self.dataset, self.val_dataset = make(samples_per_epoch, seed), make(val_samples, seed + 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """`val_samples` from another seeded pool: validation (with EMA weights swapped in) runs as in training."""
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=0, drop_last=True,
                          pin_memory=self.pin_memory)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = batch["image"].float() / 127.5 - 1.0
        return batch
