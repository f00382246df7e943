"""W&B run identity: one run per job, the jobs of a sweep in one group, the same run after a requeue.

The id lives in the job's run dir (`<save_dir>/wandb_id.txt`), so a requeued SLURM job, or any rerun with the
same `hydra.run.dir`, continues that run (`resume="allow"`); every job of a multirun has its own run dir, hence
its own run, and gets `group=<task_name>-<sweep dir name>` plus its job number in the run name.
The job's Hydra overrides become W&B tags (after the config's `tags`), and `job_type` is "sweep" for a multirun
job, "train" otherwise, unless set in the logger config.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path

from omegaconf import DictConfig, open_dict

WANDB_TARGETS = {
    "ldmlab.loggers.wandb_logger",
    "pytorch_lightning.loggers.WandbLogger",
    "pytorch_lightning.loggers.wandb.WandbLogger",
    "lightning.pytorch.loggers.WandbLogger",
}
ID_FILE = "wandb_id.txt"
MAX_TAG = 64  # W&B rejects longer tags (wandb.init raises)


def persistent_run_id(save_dir: str | Path) -> str:
    """The run id stored in `<save_dir>/wandb_id.txt`, created once by whichever process (rank) comes first."""
    path = Path(save_dir) / ID_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{ID_FILE}.{os.getpid()}")
        # W&B's own format: 8 characters of [a-z0-9]
        tmp.write_text("".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)) + "\n")
        try:
            os.link(tmp, path)  # atomic, and fails if another rank was first: all ranks read one id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def sweep_group(task_name: str) -> tuple[str, int] | None:
    """(group name, job number) when running as a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    return f"{task_name}-{Path(hc.sweep.dir).name}", int(hc.job.num)


def job_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (`.hydra/overrides.yaml`), or [] outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return []
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def as_tag(text: str) -> str:
    """`text` shortened to W&B's 64-character tag limit, keeping both ends (key and e.g. a file name)."""
    return text if len(text) <= MAX_TAG else f"{text[:30]}…{text[-(MAX_TAG - 31):]}"


def run_tags(config_tags: list[str] | None, overrides: list[str]) -> list[str]:
    """The config's tags followed by the overrides, valid for W&B and without duplicates."""
    tags = [as_tag(str(t)) for t in [*(config_tags or []), *overrides] if str(t)]
    return list(dict.fromkeys(tags))


def configure_wandb(cfg: DictConfig) -> None:
    """Fill in id/resume/tags/job_type and, in a sweep, group/name of every W&B logger (explicit values win)."""
    loggers = cfg.get("logger") or {}
    nodes = [n for n in loggers.values() if n and n.get("_target_") in WANDB_TARGETS]
    if not nodes:
        return
    sweep = sweep_group(str(cfg.get("task_name", "train")))
    for node in nodes:
        with open_dict(node):
            if node.get("id") is None:
                node.id = persistent_run_id(node.save_dir)
            if node.get("resume") is None:
                node.resume = "allow"
            node.tags = run_tags(node.get("tags"), job_overrides())
            if node.get("job_type") is None:
                node.job_type = "sweep" if sweep else "train"
            if sweep and node.get("group") is None:
                node.group = sweep[0]
                node.name = f"{node.get('name') or cfg.get('task_name')}-{sweep[1]}"
