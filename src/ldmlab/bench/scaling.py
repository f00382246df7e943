"""Weak scaling of the training path (issue #10): `train.py trainer=ddp trainer.devices=N data=wds_latents` on
synthetic latent shards at a fixed per-device batch; img/s, efficiency, peak memory, checkpoint save and resume.

    python -m ldmlab.bench.scaling                        # N = 1, 2, 4, 8 up to the GPUs seen; FSDP at the largest N
    python -m ldmlab.bench.scaling --devices 1 --fsdp-devices 1 --out docs/BENCHMARKS.md
    python -m ldmlab.bench.scaling --accelerator cpu --devices 1,2 --model unet_small --latent 8 \\
        --per-device-batch 4 --steps 6 --skip 2 --extra "data.num_workers=1"          # gloo (the test)

Every case is a fresh train.py (its warm-up, torch.compile included, is the `--skip` untimed steps); s/step is
rank 0's StepTimer (ranks step in lockstep through the gradient all-reduce). At the largest N of each strategy
every rank calls trainer.save_checkpoint after the last step (timed); a second train.py then resumes from that
file (`speed=none`: it checks restored state, not speed, and skips a compile) and, before its first step, checks
global_step, the EMA shadow and the unsharded weights against the file bit for bit, then trains on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from ldmlab.bench.common import environment
from ldmlab.bench.train_path import REPO, STEP_TIME
from ldmlab.callbacks.ema import EMA
from ldmlab.data.latents import npy_bytes
from ldmlab.data.shards import MANIFEST

log = logging.getLogger(__name__)
HERE = "ldmlab.bench.scaling"  # the callbacks' `_target_` module, also when this runs as __main__
RESUME_STEPS = 2  # steps the resumed run trains after its check: it must go on, not only load
# NVLink multicast off (the GPU hosts' notes: it can take a shared host's GPUs out of service)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PEAK = re.compile(r"PeakMemory rank (\d+): ([0-9.]+) GiB")
SAVED = re.compile(r"CkptSave: ([0-9.]+) s, (\d+) bytes")
CHECKED = re.compile(r"ResumeCheck rank (\d+): global_step=(\d+) ema_tensors=\d+ weights=\d+ exact=(\w+)")
ENDED = re.compile(r"ResumeEnd rank (\d+): global_step=(\d+)")
WORDS = ("low", "lower", "lowest", "newer", "wider", "slow", "wide", "tide", "red", "lost")


# ---------------------------------------------------------------- callbacks inside the train.py runs


class TrainEnd(pl.Callback):
    """At train end (after StepTimer's, so outside the timed steps): logs this rank's peak memory (the CUDA
    allocator's peak on a GPU; on the CPU the process's peak RSS, the only figure there), then, given `ckpt`, times
    `trainer.save_checkpoint` called by every rank (a collective under FSDP; it ends in a barrier, so the time is
    the slowest rank's)."""

    def __init__(self, ckpt: str | None = None) -> None:
        self.ckpt = Path(ckpt) if ckpt else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            gib = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        log.info("PeakMemory rank %d: %.3f GiB", trainer.global_rank, gib)
        if self.ckpt is None:
            return
        trainer.strategy.barrier("TrainEnd")
        start = time.perf_counter()
        trainer.save_checkpoint(self.ckpt)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            files = [self.ckpt] if self.ckpt.is_file() else [p for p in self.ckpt.rglob("*") if p.is_file()]
            log.info("CkptSave: %.3f s, %d bytes", seconds, sum(p.stat().st_size for p in files))


class ResumeCheck(pl.Callback):
    """Before the resumed run's first step: global_step, the EMA shadow (and the weights unless sharded) equal the
    checkpoint file's bit for bit; at its end, the step it reached. A restore bug shows here at once, where the
    loss curve would hide it for long."""

    def __init__(self, ckpt: str) -> None:
        self.ckpt = ckpt

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved = torch.load(self.ckpt, map_location="cpu", weights_only=True, mmap=True)
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        stored = saved["callbacks"]["EMA"]
        exact = (trainer.global_step == saved["global_step"] and ema.num_updates == stored["num_updates"]
                 and same(ema.shadow, stored["shadow"]))
        weights = {} if "FSDP" in type(trainer.strategy).__name__ else saved["state_dict"]  # FSDP: shards
        exact = exact and same({k: v for k, v in pl_module.state_dict().items() if k in weights}, weights)
        log.info("ResumeCheck rank %d: global_step=%d ema_tensors=%d weights=%d exact=%s", trainer.global_rank,
                 trainer.global_step, len(stored["shadow"]), len(weights), exact)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log.info("ResumeEnd rank %d: global_step=%d", trainer.global_rank, trainer.global_step)


def same(live: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bits."""
    return live.keys() == stored.keys() and all(
        live[k].dtype == v.dtype and torch.equal(live[k].detach().cpu(), v) for k, v in stored.items())


# ---------------------------------------------------------------- data and train.py runs


def write_latent_shards(root: Path, shards: int, per_shard: int, side: int, num_classes: int) -> None:
    """cache_latents' format with random values: fp16 posterior mean + std (4, side, side), `.cls` and a random
    `.txt` caption (text models encode it every step), and the manifest.json that `data.root` reads."""
    rng, counts = np.random.default_rng(0), {}
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        counts[name := f"train-{s:06d}.tar"] = per_shard
        with wds.TarWriter(str(root / name), encoder=False) as sink:
            for i in range(per_shard):
                mean = rng.standard_normal((4, side, side)).astype(np.float16)
                std = rng.uniform(0.01, 0.1, (4, side, side)).astype(np.float16)
                caption = " ".join(rng.choice(WORDS, rng.integers(3, 9)))
                sink.write({"__key__": f"{s:06d}_{i:06d}", "mean.npy": npy_bytes(mean), "std.npy": npy_bytes(std),
                            "cls": str(i % num_classes).encode(), "txt": caption.encode()})
    manifest = {"format": 1, "kind": "latents", "mode": "mean_std", "latent_shape": [4, side, side],
                "classes": None, "splits": {"train": {"samples": shards * per_shard, "shards": shards}},
                "counts": counts}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def compose_train(overrides: list[str]) -> DictConfig:
    """What train.py composes from `overrides` (hydra.* left out): bad overrides fail before any run."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])


@dataclass(frozen=True)
class Case:
    """One table row: a strategy at N devices; `ckpt`: also time a save and check a resume."""

    strategy: str
    devices: int
    ckpt: bool


def case_overrides(args: argparse.Namespace, case: Case, root: Path, clip: Path | None) -> list[str]:
    """train.py overrides of a case. The data is one resampled epoch as long as the run and its resume (the same
    in both runs): no epoch boundary inside the timed steps, and on-disk shards need not hold N × steps batches."""
    trainer = ["trainer=fsdp"] if case.strategy == "fsdp" else ["trainer=ddp", f"trainer.strategy={args.strategy}"]
    if args.accelerator == "cpu":
        trainer += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    samples = case.devices * args.per_device_batch * (args.steps + RESUME_STEPS + 1)
    return [f"model={args.model}", "model.vae=null", *([f"model.conditioner.path={clip}"] if clip else []),
            *trainer, f"trainer.devices={case.devices}", f"trainer.max_steps={args.steps}",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "data=wds_latents", f"data.root={root}", f"data.batch_size={args.per_device_batch}",
            f"data.samples_per_epoch={samples}", "callbacks.image_grids=null", "callbacks.export_weights=null",
            "callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null", "callbacks.progress_bar=null",
            *args.extra.split()]


def child_env(accelerator: str) -> dict[str, str]:
    """train.py's environment: unbuffered output; on GPUs NVLink multicast forced off (NCCL_ENV)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(NCCL_ENV if accelerator == "gpu" else {})}


def run_train(overrides: list[str], run_dir: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(exit code, output of all ranks) of train.py; on timeout its process group (ranks, workers) is killed."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return 124, proc.communicate()[0] + f"\n[killed after {timeout:.0f} s]"
    return proc.returncode, out


def failure(code: int, out: str) -> str:
    """One line for the table (the last error-looking line); the output's tail goes to stdout."""
    print(f"--- train.py exited {code}; last lines:\n" + "\n".join(out.splitlines()[-25:]), flush=True)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"Error|Exception|error:|killed after", ln)]
    return f"exit {code}: " + (errors or lines or ["no output"])[-1][:160].replace("|", "/")


def measure(args: argparse.Namespace, case: Case, base: list[str], work: Path, env: dict[str, str]) -> dict:
    """Run one case; its row: img/s from rank 0's StepTimer, peak memory (max over ranks), save and resume."""
    row: dict[str, Any] = {"strategy": case.strategy, "devices": case.devices}
    run_dir = work / f"{case.strategy}-n{case.devices}"
    ckpt = run_dir / "bench.ckpt"
    probes = ["+callbacks.step_timer._target_=ldmlab.callbacks.speed.StepTimer",
              f"+callbacks.step_timer.skip={args.skip}", f"+callbacks.train_end._target_={HERE}.TrainEnd",
              *([f"+callbacks.train_end.ckpt={ckpt}"] if case.ckpt else [])]
    start = time.perf_counter()
    code, out = run_train(base + probes, run_dir, env, args.timeout)
    rank0 = run_dir / "train.log"  # ranks r > 0 log to train_rank{r}.log (ldmlab.utils.distributed)
    step = STEP_TIME.search(rank0.read_text() if rank0.is_file() else out)
    if code != 0 or not step:
        return {**row, "error": failure(code, out)}
    row["img_s"] = case.devices * args.per_device_batch / float(step.group(1))
    row["peak_gib"] = max((float(v) for _, v in PEAK.findall(out)), default=None)
    print(f"[scaling] {case.strategy} N={case.devices}: {row['img_s']:.1f} img/s ({step.group(1)} s/step), "
          f"run {time.perf_counter() - start:.0f} s", flush=True)
    if case.ckpt and (saved := SAVED.search(out)):
        row["save_s"], row["size_gb"] = float(saved.group(1)), int(saved.group(2)) / 1e9
        row["resume"] = resume(args, case, base, ckpt, env)
        ckpt.unlink(missing_ok=True)  # SD1.5 with AdamW and EMA: ~14 GB each
    elif case.ckpt:
        row["resume"] = "no save logged"
    return row


def resume(args: argparse.Namespace, case: Case, base: list[str], ckpt: Path, env: dict[str, str]) -> str:
    """'True' when every rank of a run resumed from `ckpt` found the saved state exactly and trained on."""
    kept = [o for o in base if not o.lstrip("+~").startswith(("trainer.max_steps=", "speed=", "callbacks.speed."))]
    overrides = [*kept, f"trainer.max_steps={args.steps + RESUME_STEPS}", "speed=none", f"ckpt_path={ckpt}",
                 f"+callbacks.resume_check._target_={HERE}.ResumeCheck", f"+callbacks.resume_check.ckpt={ckpt}"]
    code, out = run_train(overrides, ckpt.parent.with_name(ckpt.parent.name + "-resume"), env, args.timeout)
    lines = [m.group(0) for m in (*CHECKED.finditer(out), *ENDED.finditer(out))]
    print(f"[scaling] {case.strategy} N={case.devices} resume: exit {code}; " + "; ".join(lines), flush=True)
    if code != 0:
        return f"failed ({failure(code, out)})"
    checked = {r: int(k) == args.steps and ok == "True" for r, k, ok in CHECKED.findall(out)}
    ended = {r: int(k) == args.steps + RESUME_STEPS for r, k in ENDED.findall(out)}
    return str(len(checked) == len(ended) == case.devices and all(checked.values()) and all(ended.values()))


# ---------------------------------------------------------------- the report


def table(rows: list[dict], cpu: bool, baseline: float | None = None) -> list[str]:
    """Markdown rows; efficiency against DDP at one device (this run's, else `baseline`)."""
    base = next((r.get("img_s") for r in rows if r["strategy"] == "ddp" and r["devices"] == 1), None) or baseline
    memory = "peak RSS GiB per process (CPU)" if cpu else "peak GiB per device"
    head = (f"| strategy | devices | img/s | img/s per device | efficiency | {memory} | ckpt save s | ckpt size GB |"
           " resume exact |")
    out = [head, "|---" * 9 + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['strategy']} | {r['devices']} | {r['error']} | | | | | | |")
            continue
        cells = [f"{r['img_s']:.1f}", f"{r['img_s'] / r['devices']:.1f}",
                 f"{r['img_s'] / (r['devices'] * base):.0%}" if base else "–", fmt(r.get("peak_gib"), ".2f"),
                 fmt(r.get("save_s"), ".2f"), fmt(r.get("size_gb"), ".3f"), r.get("resume", "–")]
        out.append(f"| {r['strategy']} | {r['devices']} | " + " | ".join(cells) + " |")
    return out


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def section(args: argparse.Namespace, argv: list[str], rows: list[dict], example: list[str]) -> str:
    """The Markdown section: heading, environment, commands, table, how each number is made."""
    generic = {"trainer.devices": "N", "data.root": "<shards>", "model.conditioner.path": "<random CLIP>",
               "data.samples_per_epoch": f"N×{args.per_device_batch}×{args.steps + RESUME_STEPS + 1}"}
    shown = " ".join(f"{k}={generic[k]}" if (k := o.split("=")[0]) in generic else o for o in example)
    notes = (f"img/s = N × {args.per_device_batch} ÷ s/step, rank 0's StepTimer over steps {args.skip}..{args.steps} "
             "(warm-up and compile untimed); efficiency = img/s ÷ (N × DDP img/s at N = 1); peak memory: max over "
             "ranks (GPU: torch.cuda.max_memory_allocated). Checkpoint: `trainer.save_checkpoint` on every rank after"
             " the last step (atomic write + fsync); resume exact: a run from that file found global_step, the EMA "
             f"shadow and the (unsharded) weights equal to the file's, bit for bit, on every rank, then trained "
             f"{RESUME_STEPS} more steps.")
    title = (f"### Weak scaling (`model={args.model}`, {args.per_device_batch} per device, "
             f"4×{args.latent}×{args.latent} latents, {args.accelerator})")
    return "\n".join([title, "", environment(), "",
                      f"`python -m ldmlab.bench.scaling {shlex.join(argv)}`", "",
                      f"Each row runs `train.py {shown}` (N = devices; FSDP rows `trainer=fsdp`).", "",
                      *table(rows, args.accelerator == "cpu", args.baseline), "", notes, ""])


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options, and `cases`: the rows to run (one-line errors for what this machine cannot run)."""
    p = argparse.ArgumentParser(prog="python -m ldmlab.bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", help="comma list of N (default 1,2,4,8; on GPUs those up to the count seen); "
                                     "none: only the FSDP row")
    p.add_argument("--per-device-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="steps per run; the first --skip are not timed")
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--model", default="unet_sd15")
    p.add_argument("--latent", type=int, default=32, help="latent side (4 channels)")
    p.add_argument("--strategy", default="ddp", help="trainer.strategy of the DDP rows (no unused parameters)")
    p.add_argument("--fsdp-devices", default="auto", help="N of the trainer=fsdp row (auto: the largest N; none)")
    p.add_argument("--ckpt", choices=("max", "all", "none"), default="max", help="rows that save and resume")
    p.add_argument("--accelerator", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--extra", default="", help="more train.py overrides, space-separated")
    p.add_argument("--out", type=Path, help="Markdown file to append the section to")
    p.add_argument("--shards-dir", type=Path, help="where the latent shards go (default: a temporary dir)")
    p.add_argument("--baseline", type=float, help="DDP img/s at N = 1 from an earlier run, for the efficiency "
                                                  "of a run without that row (e.g. --devices none)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per train.py run")
    args = p.parse_args(argv)
    args.cases = plan(args, p)
    return args


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Case]:
    """DDP at each N, then FSDP (auto: at the largest N on GPUs; none on the CPU, where Lightning has no FSDP)."""
    number = {"none": 0, "auto": -1}  # --devices none: the FSDP row alone
    try:
        wanted = sorted({int(n) for n in (args.devices or "1,2,4,8").split(",") if n != "none"})
        fsdp = number[args.fsdp_devices] if args.fsdp_devices in number else int(args.fsdp_devices)
    except ValueError as e:
        parser.error(f"--devices / --fsdp-devices take numbers: {e}")
    seen = torch.cuda.device_count() if args.accelerator == "gpu" else None
    if seen == 0:
        parser.error("--accelerator gpu, but torch sees no GPU: use --accelerator cpu (DDP over gloo)")
    if seen and args.devices is None:
        wanted = [n for n in wanted if n <= seen]
    fsdp = (wanted[-1] if seen and wanted else 0) if fsdp == -1 else fsdp
    if seen and (too := [n for n in (*wanted, fsdp) if n > seen]):
        parser.error(f"{too[0]} devices asked for, but this machine sees {seen} GPU(s): ask for at most {seen}")
    if not (wanted or fsdp) or min(wanted or [1]) < 1 or fsdp < 0 or args.steps <= args.skip:
        parser.error("nothing to run, or devices < 1, or --steps not more than --skip")
    cases = [Case("ddp", n, args.ckpt == "all" or (args.ckpt == "max" and n == wanted[-1])) for n in wanted]
    return cases + ([Case("fsdp", fsdp, args.ckpt != "none")] if fsdp else [])


def prepare_data(args: argparse.Namespace, root: Path, model: DictConfig) -> None:
    """Latent shards, once: 4 per rank of the largest N (one per loader worker: no two slots share a shard)."""
    if (root / MANIFEST).is_file():
        shape = json.loads((root / MANIFEST).read_text()).get("latent_shape")
        if shape != [4, args.latent, args.latent]:
            raise SystemExit(f"--shards-dir {root} holds {shape} latents, not 4x{args.latent}x{args.latent}")
        return
    write_latent_shards(root, 4 * max(c.devices for c in args.cases), max(args.per_device_batch, 32), args.latent,
                        model.conditioner.get("num_classes") or 10)


def main(argv: list[str] | None = None) -> str:
    """Run every case, print the section (and append it to --out); returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = child_env(args.accelerator)
    with tempfile.TemporaryDirectory(prefix="ldmlab-scaling-") as tmp:
        work = Path(tmp)
        root, clip = args.shards_dir or work / "shards", None
        try:  # a bad override stops here in one line, not in every rank of every run
            configs = [compose_train(case_overrides(args, case, root, None)) for case in args.cases]
        except HydraException as e:
            raise SystemExit(f"train.py would not compose: {e}") from None
        model = configs[0].model
        prepare_data(args, root, model)
        if model.conditioner._target_.endswith("TextConditioner"):  # a random CLIP of the U-Net's context width
            from ldmlab.utils.stand_ins import make_tiny_clip

            clip = make_tiny_clip(work / "clip", hidden_size=model.unet.context_dim)
        bases = [case_overrides(args, case, root, clip) for case in args.cases]
        rows = [measure(args, case, base, work, env) for case, base in zip(args.cases, bases)]
    text = section(args, argv, rows, bases[0])
    print(text, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
