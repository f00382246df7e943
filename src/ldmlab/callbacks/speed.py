"""GPUSpeed: the speed switches of `trainer=gpu` (conf/speed/gpu.yaml), applied to the model from outside before
the strategy wraps it, with what `compile: auto` / `compile_mode: auto` mean for each kind of module (AUTO);
StepTimer: steady-state seconds per step, for the benchmarks and for `train.py` runs that want it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ldmlab import accel
from ldmlab.lit.ldm import LatentDiffusionModule
from ldmlab.lit.vae import VAEModule

log = logging.getLogger(__name__)
COMPILE_MODES = (None, "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class AutoCompile:
    """What `compile: auto` and `compile_mode: auto` resolve to for one kind of LightningModule."""

    scope: accel.CompileScope
    cuda_graphs: bool  # in a one-process run: compile mode reduce-overhead (the compiled step replayed as graphs)


# The speed policy by what the module is; the modules carry no speed flags. Each choice was measured against the
# others on a GPU (docs/BENCHMARKS.md, issue 7 sessions 4-5).
AUTO: dict[type[pl.LightningModule], AutoCompile] = {
    # one forward, one backward and one optimizer per step, no host syncs in the step (bench.train_path's
    # SyncReport), static shapes: the whole step can be captured in CUDA graphs, which removes the launch cost
    # that leaves the compiled step host-bound; checked with validation, EMA swaps, checkpoints and a resume
    LatentDiffusionModule: AutoCompile("full", cuda_graphs=True),
    # G and D steps, and the adaptive GAN weight differentiates two losses w.r.t. the decoder's last conv every
    # step: per-block graphs beat the encoder + decoder-trunk graphs (accel.WHOLE); not measured under CUDA graphs
    VAEModule: AutoCompile("regional", cuda_graphs=False),
}
OTHER = AutoCompile("full", cuda_graphs=False)  # a module not in AUTO: one graph per network, torch's default mode


def resolve_compile(compile: str, compile_mode: str | None, module: pl.LightningModule,
                    world_size: int) -> tuple[accel.CompileScope, str | None]:
    """(scope, mode) for `module`: an explicit setting as given, `auto` from AUTO. CUDA graphs only in a
    one-process run: DDP's gradient hooks and FSDP's gathers have not been checked under them."""
    policy = next((p for kind, p in AUTO.items() if isinstance(module, kind)), OTHER)
    scope = policy.scope if compile == "auto" else compile
    if compile_mode != "auto":
        return scope, compile_mode  # type: ignore[return-value]
    return scope, "reduce-overhead" if policy.cuda_graphs and world_size == 1 else None  # type: ignore[return-value]


class GPUSpeed(pl.Callback):
    """channels_last, torch.compile (`compile`: none | regional: each repeated block | full: each network whole
    | auto: AUTO's scope for the module; `compile_mode`: a torch.compile mode or auto: AUTO's), the SDPA backend
    order, TF32, `torch._inductor.config` settings (`inductor`, e.g. {conv_1x1_as_mm: true}).

    Applied in `setup` (all networks exist, nothing is wrapped by DDP/FSDP or moved yet): DDP's gradient
    buckets then follow the NHWC parameter layout, and the compiled blocks are the ones every rank runs.
    Layers are changed in place: state-dict names, checkpoints and exports are those of the plain model.
    """

    def __init__(self, compile: str = "auto", channels_last: bool = True,
                 compile_mode: str | None = None, sdpa_backends: list[str] | None = None,
                 tf32: bool = True, inductor: dict[str, Any] | None = None, dynamic: bool | None = False) -> None:
        if compile not in ("none", "regional", "full", "auto"):
            raise ValueError(f"callbacks.speed.compile={compile!r}: valid are auto, none, regional, full")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"callbacks.speed.compile_mode={compile_mode!r}: valid are auto, null (default), "
                             "reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
        self.compile, self.channels_last, self.compile_mode = compile, channels_last, compile_mode
        self.sdpa_backends, self.tf32 = sdpa_backends, tf32
        self.inductor = dict(inductor or {})
        self.dynamic = dynamic  # accel.compile_model's: False, one graph per shape (per bucket); True, one for all
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
        scope, mode = self.resolve(pl_module, trainer.world_size)
        compiled = accel.compile_model(pl_module, scope, mode=mode, dynamic=self.dynamic)
        log.info("speed: channels_last=%s, compile=%s (%d modules, mode %s), sdpa=%s", self.channels_last,
                 scope, compiled, mode or "default", self.sdpa_backends or "torch default")

    def resolve(self, pl_module: pl.LightningModule, world_size: int) -> tuple[accel.CompileScope, str | None]:
        """The compile scope and mode this callback applies to `pl_module` (resolve_compile)."""
        return resolve_compile(self.compile, self.compile_mode, pl_module, world_size)


class StepTimer(pl.Callback):
    """Seconds per training step after `skip` warm-up steps (compilation, cuDNN autotuning), GPU-synchronised
    only at the two ends so the steps in between run as they would without it. The steps are counted from this
    fit's first (a resumed run warms up again); `path`: also write the result there as JSON when training ends."""

    def __init__(self, skip: int = 5, path: str | None = None) -> None:
        self.skip, self.path = skip, path
        self._fit_start = self._start = self._end = 0.0
        self._steps = 0
        self._first: int | None = None  # global_step of this fit's first batch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._first is None:
            self._first = trainer.global_step
        if trainer.global_step == self._first + self.skip:
            synchronize_device(pl_module)
            self._start = time.perf_counter()
            self._steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps += 1
        if 0 < trainer.max_steps <= trainer.global_step:  # the clock stops before the final checkpoint is written
            synchronize_device(pl_module)
            self._end = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._end:  # stopped otherwise than by max_steps
            synchronize_device(pl_module)
            self._end = time.perf_counter()
        if self._start and self._steps:
            log.info("StepTimer: %.4f s/step over %d steps", self.seconds_per_step, self._steps)
        if self.path is not None and trainer.is_global_zero:
            self.write(Path(self.path))

    def write(self, path: Path) -> None:
        """{seconds_per_step (null: no step after the warm-up), steps, skip, warmup_seconds} as JSON at `path`."""
        timed = bool(self._start and self._steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds_per_step": self.seconds_per_step if timed else None,
                                    "steps": self._steps if timed else 0, "skip": self.skip,
                                    "warmup_seconds": self.warmup_seconds() if timed else None}, indent=1) + "\n")

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
