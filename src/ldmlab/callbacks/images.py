"""ImageGrids: saves the module's `log_images(batch)` grids as PNGs in the run dir and sends them to loggers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from ldmlab.lit.contract import TrainingModule
from ldmlab.utils.images import make_grid, save_png


class ImageGrids(pl.Callback):
    """On the first validation batch of every validation run, log the module's image grids.

    The module's `TrainingModule.log_images(batch, num_images) -> dict[name, (N, C, H, W) in [-1, 1]]`
    (LDM's `log_images` protocol, lit.contract); each entry becomes `<dirpath>/<name>_step<global_step>.png`.
    """

    def __init__(self, dirpath: str | Path, num_images: int = 8, nrow: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.nrow = nrow or num_images

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not isinstance(pl_module, TrainingModule):
            return
        images = pl_module.log_images(batch, self.num_images)
        self._write(trainer, images)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, images: dict[str, Tensor]) -> None:
        for name, batch_images in images.items():
            grid = make_grid(batch_images, nrow=self.nrow)
            path = save_png(grid, self.dirpath / f"{name}_step{trainer.global_step:07d}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"images/{name}", images=[str(path)], step=trainer.global_step)
                elif isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
