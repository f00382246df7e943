"""GPUSpeed: the speed switches of `trainer=gpu` (conf/callbacks/speed), applied before the strategy wraps the
model; StepTimer: steady-state seconds per step, for the benchmarks and for `train.py` runs that want it."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
import torch

from ldmlab import accel

log = logging.getLogger(__name__)


class GPUSpeed(pl.Callback):
    """channels_last, torch.compile (the whole U-Net/VAE, or regional: each repeated block; auto, the default as
    in conf/speed/gpu.yaml: the scope the module measured fastest), the SDPA backend order, TF32,
    `torch._inductor.config` settings (`inductor`, e.g. {conv_1x1_as_mm: true}).

    Applied in `setup` (all networks exist, nothing is wrapped by DDP/FSDP or moved yet): DDP's gradient
    buckets then follow the NHWC parameter layout, and the compiled blocks are the ones every rank runs.
    Layers are changed in place: state-dict names, checkpoints and exports are those of the plain model.
    """

    def __init__(self, compile: str = "auto", channels_last: bool = True,
                 compile_mode: str | None = None, sdpa_backends: list[str] | None = None,
                 tf32: bool = True, inductor: dict[str, Any] | None = None) -> None:
        if compile not in ("none", "regional", "full", "auto"):
            raise ValueError(f"callbacks.speed.compile={compile!r}: valid are auto, none, regional, full")
        if compile_mode not in (None, "auto", "default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"):
            raise ValueError(f"callbacks.speed.compile_mode={compile_mode!r}: valid are auto, null (default), "
                             "reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
        self.compile, self.channels_last, self.compile_mode = compile, channels_last, compile_mode
        self.sdpa_backends, self.tf32 = sdpa_backends, tf32
        self.inductor = dict(inductor or {})
        accel.check_inductor(self.inductor)  # a misspelt name fails before any data or model is built
        self._applied = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._applied:  # fit then test in one process: the model is already set up
            return
        self._applied = True
        if trainer.strategy.root_device.type != "cuda":  # e.g. trainer=ddp trainer.accelerator=cpu (gloo)
            log.info("speed: %s run, GPU speed switches left off", trainer.strategy.root_device.type)
            return
        if self.tf32:
            accel.enable_tensor_cores()
        accel.set_sdpa_order(self.sdpa_backends)
        accel.set_inductor(self.inductor)
        if self.channels_last:
            accel.to_channels_last(pl_module)
        mode, scope = self.resolve_mode(trainer, pl_module), self.resolve_scope(pl_module)
        compiled = accel.compile_model(pl_module, scope, mode=mode)
        log.info("speed: channels_last=%s, compile=%s (%d modules, mode %s), sdpa=%s", self.channels_last,
                 scope, compiled, mode or "default", self.sdpa_backends or "torch default")

    def resolve_scope(self, pl_module: pl.LightningModule) -> accel.CompileScope:
        """`compile=auto`: the scope the module declares as its fastest (`compile_scope`; the VAE: regional,
        measured on an H100), else full."""
        if self.compile != "auto":
            return self.compile  # type: ignore[return-value]
        return getattr(pl_module, "compile_scope", "full")

    def resolve_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """`compile_mode=auto`: CUDA graphs (reduce-overhead) for a module that declares its step safe for them
        (`cuda_graphs_safe`, the LDM: checked on an H100 with validation, EMA swaps, checkpoints and a resume)
        in a one-process run; torch's default mode elsewhere (DDP's gradient hooks and FSDP's gathers are
        unmeasured under graphs; the VAE's step takes two extra backward passes for its adaptive GAN weight)."""
        if self.compile_mode != "auto":
            return self.compile_mode
        graphs = trainer.world_size == 1 and getattr(pl_module, "cuda_graphs_safe", False)
        return "reduce-overhead" if graphs else None


class StepTimer(pl.Callback):
    """Seconds per training step after `skip` warm-up steps (compilation, cuDNN autotuning), GPU-synchronised
    only at the two ends so the steps in between run as they would without it."""

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self._fit_start = self._start = self._end = 0.0
        self._steps = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.skip:
            synchronize_device(pl_module)
            self._start = time.perf_counter()
            self._steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize_device(pl_module)
        self._end = time.perf_counter()
        if self._start and self._steps:
            log.info("StepTimer: %.4f s/step over %d steps", self.seconds_per_step, self._steps)

    @property
    def seconds_per_step(self) -> float:
        if not (self._start and self._steps):
            raise RuntimeError(f"StepTimer saw no step after the {self.skip} warm-up steps: raise max_steps")
        return (self._end - self._start) / self._steps

    def warmup_seconds(self, since: float | None = None) -> float:
        """Wall seconds from `since` (default: fit start) to the first timed step."""
        return self._start - (since if since is not None else self._fit_start)


def synchronize_device(pl_module: pl.LightningModule) -> None:
    """Wait for the module's GPU (a no-op on the CPU): timings and profiles then end where the work does."""
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)
