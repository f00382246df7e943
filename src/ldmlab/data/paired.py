"""`data=dreambooth`: a batch of instance images and a batch of class images in every step (DreamBooth's
prior-preservation loss needs both in one step, Ruiz et al. 2023 eq. 2).

Two ShardDataModules, one per stream. Lightning combines the dict of training loaders (`{"instance": ...,
"prior": ...}`, its CombinedLoader, max_size_cycle) and stores each loader's position in checkpoints, so a
resumed run continues both streams. The class images are drawn by the model before training (the module's
`prepare_data`, which Lightning runs after this module's and before any `setup`); without prior preservation
(`prior_weight=0`) batches are the instance stream's own. Validation draws grids with the instance captions.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ldmlab.data.module import ShardDataModule
from ldmlab.data.pipeline import EpochLoader


class DreamBoothData(pl.LightningDataModule):
    """Instance images (`instance`, with their "a [identifier] [class noun]" captions) and, when
    `prior_weight > 0`, the generated class images (`prior`)."""

    def __init__(self, instance: ShardDataModule, prior: ShardDataModule, prior_weight: float = 1.0) -> None:
        super().__init__()
        self.instance = instance
        self.prior = prior if prior_weight > 0 else None

    def parts(self) -> dict[str, ShardDataModule]:
        return {"instance": self.instance, **({"prior": self.prior} if self.prior is not None else {})}

    def prepare_data(self) -> None:
        self.instance.prepare_data()  # the class images are the model's to draw (LatentDiffusionModule.prepare_data)

    def setup(self, stage: str | None = None) -> None:
        for part in self.parts().values():
            part.trainer = self.trainer
        if self.instance.val_urls is None and self.instance.val_url_list() is None:
            self.instance.val_urls = self.instance.train_sources()[0]  # grids of the instance prompts
        self.instance.setup(stage)
        if self.prior is not None and stage in (None, "fit"):
            self.prior.setup("fit")

    def train_dataloader(self) -> EpochLoader | dict[str, EpochLoader]:
        if self.prior is None:
            return self.instance.train_dataloader()
        return {name: part.train_dataloader() for name, part in self.parts().items()}

    def val_dataloader(self) -> EpochLoader | list:
        return self.instance.val_dataloader()

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict[str, Any]:
        if self.prior is not None and "prior" in batch:  # a training step: one batch of each stream
            return {name: part.on_after_batch_transfer(batch[name], dataloader_idx)
                    for name, part in self.parts().items()}
        return self.instance.on_after_batch_transfer(batch, dataloader_idx)
