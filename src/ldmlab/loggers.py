"""Logger factories that need more than a `_target_` (W&B offline fallback)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info


def wandb_api_key_present() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that logs offline (and says how to sync) when no API key is configured."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_api_key_present()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        rank_zero_info(
            f"W&B: no API key found, logging offline to {save_dir}/wandb; "
            f"upload later with: wandb sync {save_dir}/wandb/offline-run-*"
        )
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def finish_wandb(loggers: list[Any], failed: bool = False) -> None:
    """End the W&B run of this job: otherwise the next job of a multirun (same process) logs into it."""
    if not any(isinstance(lg, WandbLogger) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
