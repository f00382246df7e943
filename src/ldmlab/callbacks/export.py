"""ExportWeights: writes the module's deployable weights as safetensors when training ends."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from ldmlab.callbacks.ema import EMA
from ldmlab.lit.contract import TrainingModule


class ExportWeights(pl.Callback):
    """At the end of fit, call `pl_module.export_weights(dirpath, ema)` on rank zero and report the files; `ema`
    holds the EMA callback's average (by the submodule it averages) when the trainer has one."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, TrainingModule):
            return
        ema = {cb.attr: cb.averaged() for cb in trainer.callbacks if isinstance(cb, EMA) and cb.shadow}
        for path in pl_module.export_weights(self.dirpath, ema):
            rank_zero_info(f"exported weights: {path}")
