"""slurm/train.sbatch and hydra/launcher=slurm on a real SLURM cluster started on this host (tests/slurm_cluster.py).

Skipped, with the reason, when not root or when Debian's SLURM packages cannot be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY, shared_data_dir
from slurm_cluster import FINAL_STATES, SlurmCluster, unavailable_reason
from test_sweeps import global_step, last_metric, logged_steps, wandb_runs

pytestmark = pytest.mark.slurm

CPU = [*TINY, "model.loss.perceptual_weight=0", "trainer.accelerator=cpu", "trainer.precision=32-true"]
# the emulated nodes have no GPUs and 1-2 CPUs: override the script's per-node GPU request
NO_GPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """munged, slurmctld and three slurmd for this module; stopped by PID whatever happens."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    slurm = SlurmCluster()
    try:
        slurm.start()
    except RuntimeError as e:  # another session holds the test cluster
        pytest.skip(str(e))
    try:
        yield slurm
    finally:
        slurm.stop()


def job_env(tmp_path: Path) -> dict[str, str]:
    """What sbatch hands the job: this venv first on PATH, W&B offline, no key; MASTER_ADDR because the
    emulated node names do not resolve."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "MASTER_ADDR": "127.0.0.1",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def submit(cluster: SlurmCluster, tmp_path: Path, sbatch_args: list[str], overrides: list[str]) -> tuple[str, Path]:
    """`sbatch <args> slurm/train.sbatch <overrides>` from the repo root; (job id, its run dir)."""
    job = cluster.sbatch(*sbatch_args, *NO_GPU, f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch",
                         *CPU, f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}", *overrides,
                         env=job_env(tmp_path), cwd=REPO)
    return job, tmp_path / "outputs" / "debug" / "runs" / f"slurm-{job}"


def history(run_dir: Path) -> list[dict]:
    """SlurmRequeue's start/requeue/end records of a run."""
    path = run_dir / "slurm_history.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # [:-1]: a line being written
    return [json.loads(line) for line in lines]


def job_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / f"slurm-{job}.out").read_text(errors="replace")


def logged_a_step(run_dir: Path) -> bool:
    """The run's metrics.csv has a row (the continuing CSV logger writes each row at once)."""
    path = run_dir / "csv" / "metrics.csv"
    return path.exists() and len(path.read_text().splitlines()) >= 2


def wait_for_start(cluster: SlurmCluster, job: str, run_dir: Path, tmp_path: Path) -> None:
    """Until training has passed its first step boundary (the signal handlers are installed by then).

    A signal before the first step ends cannot be answered with a checkpoint (there is no step boundary yet;
    nothing is lost either): on this 2-core machine under load the first step, with DDP and loader start-up,
    has taken longer than SLURM's 30 s KillWait, so the test signals only once a step has been logged."""
    deadline = time.monotonic() + 300
    while not (history(run_dir) and logged_a_step(run_dir)):
        state = cluster.job(job)["JobState"]  # PENDING, RUNNING, COMPLETING, REQUEUED ... not a final one
        assert time.monotonic() < deadline and state not in FINAL_STATES, job_log(tmp_path, job)[-4000:]
        time.sleep(0.2)


def check_resumed_once(run_dir: Path, stop_event: str) -> int:
    """The run stopped once (`stop_event`) with a checkpoint and resumed from it to step 6; the stop step."""
    events = history(run_dir)
    assert [(h["event"], h["restart"]) for h in events] == [("start", 0), (stop_event, 0), ("start", 1), ("end", 1)]
    stop, start, end = events[1:]
    step = stop["global_step"]
    assert 1 <= step < 6 and stop["batches"] == step and stop["checkpoint"] == "hpc_ckpt_1.ckpt"
    assert start["global_step"] == step and end["global_step"] == 6 and end["batches"] == 6 - step  # no step twice
    assert global_step(run_dir / "hpc_ckpt_1.ckpt") == step
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 6
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]  # the same run dir after the restart
    return step


def test_sbatch_trains_two_ranks_on_two_nodes_through_a_requeue(cluster: SlurmCluster, tmp_path: Path) -> None:
    """2 nodes x 1 rank; `scontrol requeue` mid-run (SIGTERM to every task, as a preemption): the ranks save an
    hpc checkpoint at the next step, SLURM restarts the job, it resumes there and trains to completion."""
    job, run_dir = submit(cluster, tmp_path, ["--partition=multi", "--nodes=2", "--ntasks-per-node=1"], [])
    wait_for_start(cluster, job, run_dir, tmp_path)
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait(job, timeout=420)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert info["NodeList"] == "n[1-2]" and "2 node(s) x 1 task(s)" in log
    assert log.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2 and "distributed_backend=gloo" in log  # both starts
    # rank 0 alone wrote .hydra/; rank 1 logged to its own file
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train_rank1.log").exists()
    check_resumed_once(run_dir, "preempted")
    assert f"Restoring states from the checkpoint path at {run_dir}/hpc_ckpt_1.ckpt" in log
    assert last_metric(run_dir, "val/psnr") > 0


def test_time_limit_signal_checkpoints_requeues_and_resumes_the_same_wandb_run(cluster: SlurmCluster,
                                                                              tmp_path: Path) -> None:
    """SIGUSR1, what `--signal=SIGUSR1@90` sends before the time limit: the job saves an hpc checkpoint,
    requeues itself, and resumes in the same run dir and W&B run; every step is logged exactly once."""
    job, run_dir = submit(cluster, tmp_path, ["--partition=single", "--nodes=1", "--ntasks-per-node=2"],
                          ["logger=[csv,wandb]"])
    wait_for_start(cluster, job, run_dir, tmp_path)
    cluster.run("scancel", "--signal=USR1", job)  # to every task of the job's steps, as the time limit would
    info = cluster.wait(job, timeout=420)
    log = job_log(tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    step = check_resumed_once(run_dir, "requeue")
    assert f"Restoring states from the checkpoint path at {run_dir}/hpc_ckpt_1.ckpt" in log
    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"] == (run_dir / "wandb_id.txt").read_text().strip()
    assert [logged_steps(r, "train/rec_loss") for r in runs] == [list(range(step)), list(range(step, 6))]


def test_multirun_through_the_slurm_launcher_runs_two_jobs(cluster: SlurmCluster, tmp_path: Path) -> None:
    """`-m hydra/launcher=slurm`: submitit submits one SLURM job per sweep point and collects them."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.partition=multi",
           "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           *CPU, "logger=[csv,wandb]", "model.loss.kl_weight=1e-6,1e-5", f"hydra.sweep.dir={sweep}",
           f"paths.root_dir={tmp_path}", f"paths.data_dir={shared_data_dir()}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**job_env(tmp_path), **cluster.env}, capture_output=True,
                          text=True, timeout=480, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    script = next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR1@90" in script and "#SBATCH --requeue" in script
    job_ids, ids = set(), set()
    for num, kl in (("0", "1e-06"), ("1", "1e-05")):
        job = sweep / num
        assert f"model.loss.kl_weight={kl}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert global_step(job / "checkpoints" / "last.ckpt") == 6
        job_ids.add(history(job)[0]["job_id"])  # SlurmRequeue only records on SLURM
        [run] = wandb_runs(job)
        assert run["group"] == "debug-sweep" and run["name"] == f"debug-{num}"
        ids.add(run["id"])
    assert len(job_ids) == 2 and len(ids) == 2
