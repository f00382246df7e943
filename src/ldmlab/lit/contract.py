"""The seam between ldmlab's LightningModules and its callbacks and entry points (STYLE 17).

Callbacks and train.py/sample.py find a module's parts through `TrainingModule` (by isinstance), never by
`hasattr` or a string:
- `skips` (`lit.nonfinite.NonFiniteSkips`): NonFiniteGuard counts `skips.reports`; the EMA leaves out a batch
  whose update `skips.skipped_on_host` lists.
- `log_images(batch, num_images)`: the grids ImageGrids writes (name → (N, C, H, W) in [-1, 1]; {}: none).
- `export_weights(dirpath, ema)`: the deployable safetensors ExportWeights writes when fit ends; `ema` maps a
  submodule's attribute name to the EMA callback's average of its weights.
- `config_yaml`: the run's resolved config (train.py sets it), stored in checkpoints as `ldmlab_config` so
  sample.py can rebuild the model.
- `trainer.global_step` counts batches, skipped or not (lit.nonfinite).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from ldmlab.lit.nonfinite import NonFiniteSkips, skipping


class TrainingModule(pl.LightningModule):
    """The base of ldmlab's modules: NaN/Inf skipping wired in, and what the callbacks may use (module docstring).

    A subclass names one loss per optimizer (`loss_names`, in the order of `configure_optimizers`), wraps each
    optimizer with `self.skipping(...)`, and calls super() in the hooks it overrides.
    """

    loss_names: tuple[str, ...] = ("train/loss",)
    progress_name = "loss"  # the progress bar's name for `skips.last_loss`

    def __init__(self) -> None:
        super().__init__()
        self.skips = NonFiniteSkips(self.loss_names)
        self.config_yaml: str | None = None

    def log_images(self, batch: dict[str, Any], num_images: int = 8) -> dict[str, Tensor]:
        """Image grids for ImageGrids; none by default."""
        return {}

    def export_weights(self, dirpath: str | Path, ema: dict[str, dict[str, Tensor]] | None = None) -> list[Path]:
        """Write the deployable weights under `dirpath` (EMA averages where given); nothing by default."""
        return []

    def skipping(self, name: str, optimizer: Optimizer,
                 scheduler_factory: Callable[[Optimizer], Any] | None) -> tuple[Optimizer, Any]:
        """`optimizer` skipping non-finite steps of loss `name`, and its LR scheduler (lit.nonfinite)."""
        return skipping(self.skips, name, optimizer, scheduler_factory)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.skips.begin(self.global_step)

    def on_before_backward(self, loss: Tensor) -> None:
        self.skips.observe(loss, self.trainer.strategy.reduce)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (shown := self.skips.shown_loss()) is not None:
            # a CPU tensor: Lightning turns a Python number into a tensor on the module's device, a blocking copy
            self.log(self.progress_name, torch.tensor(shown), prog_bar=True, logger=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_skips"] = self.skips.state_dict()
        if self.config_yaml is not None:
            checkpoint["ldmlab_config"] = self.config_yaml

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_skips" in checkpoint:
            self.skips.load_state_dict(checkpoint["nonfinite_skips"])
