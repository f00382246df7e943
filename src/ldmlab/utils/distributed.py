"""Hydra × Lightning DDP on one node: ranks > 0 re-run this job, not the sweep, in rank 0's run dir.

Lightning's launcher starts ranks 1..N-1 by re-running the script. For Hydra apps it re-runs `sys.argv` plus
`hydra.run.dir=<rank 0's dir>` (lightning_fabric `_hydra_subprocess_cmd`): under `-m` every child would then
run the whole sweep, in sweep dirs of its own. `child_command` instead starts a single run of this job with
its own overrides, in RUN mode, in rank 0's output dir, and without writing a second `.hydra/` there.
`ddp_job` wraps `train()`: it installs that command and, when the job ends, tears down the process group and
the launcher's environment variables, so the next job of an in-process multirun launches fresh ranks.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
# Hydra flags that locate the config: kept (with their values) for the children; `-m` and overrides are not.
_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# set by Lightning's launcher in the parent process; a later job would read them as "launched externally"
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def config_flags(argv: list[str]) -> list[str]:
    """The config-location flags of a Hydra command line (`-cn x`, `--config-name=x`, ...), in order."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            kept += argv[i:i + 2]
            i += 1
        elif arg.startswith(tuple(f"{f}=" for f in _CONFIG_FLAGS)):
            kept.append(arg)
        i += 1
    return kept


def _quote(value: str) -> str:
    """A Hydra override value quoted so that any path parses as one string."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_command(local_rank: int) -> tuple[list[str], str]:
    """Command and cwd for Lightning's rank `local_rank`: this job's overrides, RUN mode, rank 0's output dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        cmd = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        cmd = [sys.executable, "-m", __main__.__spec__.name]
    cmd += config_flags(sys.argv[1:])
    cmd += [o for o in hc.overrides.hydra if not o.startswith("hydra.mode=")]
    cmd += list(hc.overrides.task)  # for a sweep job: its own values, e.g. optimizer.lr=2e-4, not the list
    cmd += [f"hydra.run.dir={_quote(hc.runtime.output_dir)}", "hydra.mode=RUN",
            "hydra.output_subdir=null",  # rank 0 alone writes .hydra/
            f"hydra.job.name={hc.job.name}_rank{local_rank}"]  # own log file: <run dir>/train_rank1.log
    return cmd, get_original_cwd()


def install_child_command() -> None:
    """Make Lightning's DDP launcher (pytorch_lightning 2.x) start ranks > 0 with `child_command`."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = child_command  # module global, looked up at launch time


def ddp_job(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a training function: DDP children re-run its job; nothing distributed outlives it."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        install_child_command()
        before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return wrapper


def gather_per_rank(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]: states that differ per rank, saved in the one file rank 0 writes.

    A collective: Lightning builds the checkpoint dict on every rank (`Trainer.save_checkpoint` must be called
    on all of them), so every rank gets here together. [obj] without torch.distributed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def this_rank() -> int:
    """The global rank of this process (0 without torch.distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
