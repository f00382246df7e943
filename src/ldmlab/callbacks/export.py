"""ExportWeights: writes the module's deployable weights as safetensors when training ends."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only


class ExportWeights(pl.Callback):
    """At the end of fit, call `pl_module.export_weights(dirpath)` on rank zero and report the files."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "export_weights"):
            return
        for path in pl_module.export_weights(self.dirpath):
            rank_zero_info(f"exported weights: {path}")
