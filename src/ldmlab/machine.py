"""What the machine decides, resolved once before anything is built (ldmlab.run.train calls `resolve_machine`).

conf/trainer/default.yaml leaves to the machine: `accelerator: auto` (the GPUs when CUDA shows any, else the
CPU), `precision: auto` (bf16-mixed on GPUs that support it, else 32-true), `strategy: auto` (DDP when
devices x num_nodes > 1), `benchmark: auto` (cuDNN autotuning on CUDA) and, through `speed=auto`, the GPU speed
switches of conf/speed/gpu.yaml exactly when the run is on CUDA. Whatever else the command line or a trainer
preset sets explicitly stays as it is. Whether DDP must search for parameters without gradients is the model's
to say (`find_unused_parameters` in conf/model/*.yaml: the VAE's GAN steps toggle requires_grad).
Tests simulate a node by passing a `Machine` (or by patching torch.cuda, which `Machine.detect` alone reads).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from ldmlab.configs import CONF_DIR
from ldmlab.validate import ConfigError

log = logging.getLogger(__name__)
AUTO = "auto"
CUDA_ACCELERATORS = ("gpu", "cuda")
# the speed option `speed=auto` becomes on CUDA (conf/speed/auto.yaml names it)
SPEED_MARKER = "on_cuda"


@dataclass(frozen=True)
class Machine:
    """The facts a run's defaults follow: how many CUDA devices this process sees, and whether they do bf16."""

    gpus: int
    bf16: bool

    @classmethod
    def detect(cls) -> Machine:
        """This process's view (CUDA_VISIBLE_DEVICES applies), read once per run. bf16 means native (compute
        capability 8.0 on): torch also emulates it on older GPUs, without the speed that bf16 is chosen for."""
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(gpus=gpus, bf16=gpus > 0 and torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_machine(cfg: DictConfig, machine: Machine | None = None) -> DictConfig:
    """Replace the `auto` trainer and speed values of a composed train config with what `machine` decides."""
    machine = machine or Machine.detect()
    trainer = cfg.trainer
    with open_dict(cfg):
        trainer.accelerator = _accelerator(trainer, machine)
        on_cuda = trainer.accelerator in CUDA_ACCELERATORS
        if on_cuda:
            _check_visible(trainer, machine)
        if _is(trainer.get("devices"), AUTO, -1):
            trainer.devices = machine.gpus if on_cuda else 1
        if _is(trainer.get("precision"), AUTO):
            trainer.precision = "bf16-mixed" if on_cuda and machine.bf16 else "32-true"
        if _is(trainer.get("benchmark"), AUTO):
            trainer.benchmark = on_cuda
        trainer.strategy = _strategy(trainer, bool(cfg.get("find_unused_parameters", False)))
        if "callbacks" in cfg and cfg.callbacks is not None:
            _resolve_speed(cfg.callbacks, on_cuda)
    speed = "on" if OmegaConf.select(cfg, "callbacks.speed._target_") else "off"
    log.info("machine: %d GPU(s)%s -> accelerator=%s devices=%s num_nodes=%s strategy=%s precision=%s, speed %s",
             machine.gpus, " (bf16)" if machine.bf16 else "", trainer.accelerator, trainer.devices,
             trainer.get("num_nodes", 1), trainer.strategy if isinstance(trainer.strategy, str) else "custom",
             trainer.precision, speed)
    return cfg


def _is(value: Any, *options: Any) -> bool:
    """`value` is a scalar equal to one of `options` (a list or dict never is)."""
    return not isinstance(value, (DictConfig, ListConfig)) and value in options


def _accelerator(trainer: DictConfig, machine: Machine) -> str:
    """`auto`: the GPUs when CUDA shows any; without one, the CPU, unless several devices were asked for."""
    accelerator = trainer.get("accelerator", AUTO)
    if accelerator != AUTO:
        return accelerator
    if machine.gpus:
        return "gpu"
    count = _device_count(trainer.get("devices"))
    if count is not None and count > 1:
        raise ConfigError([(f"trainer.devices={count} asks for {count} GPUs but none is visible "
                            f"(torch.cuda.device_count() = 0{_visible_env()}): run on a GPU node, or pass "
                            f"trainer.accelerator=cpu for {count} CPU processes (gloo)")])
    return "cpu"


def _check_visible(trainer: DictConfig, machine: Machine) -> None:
    """A GPU run asks for no more devices than this process sees: one line saying what to pass instead."""
    count = _device_count(trainer.get("devices"))
    if machine.gpus == 0:
        raise ConfigError([(f"trainer.accelerator={trainer.accelerator} but no GPU is visible "
                            f"(torch.cuda.device_count() = 0{_visible_env()}): run on a GPU node, or pass "
                            "trainer.accelerator=cpu trainer.precision=32-true")])
    if count is not None and count > machine.gpus:
        verb = "is" if machine.gpus == 1 else "are"
        raise ConfigError([(f"trainer.devices={trainer.devices} asks for {count} GPUs but {machine.gpus} {verb} "
                            f"visible (torch.cuda.device_count(){_visible_env()}): pass "
                            f"trainer.devices={machine.gpus}, or run where {count} are")])


def _device_count(devices: Any) -> int | None:
    """How many devices `trainer.devices` names (an int, "8", a list or "0,1"); None for auto / -1."""
    if isinstance(devices, (ListConfig, list)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    return devices if isinstance(devices, int) and devices >= 0 else None


def _visible_env() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"; CUDA_VISIBLE_DEVICES={value}" if value is not None else ""


def _strategy(trainer: DictConfig, find_unused: bool) -> Any:
    """`auto` over several processes, and plain `ddp`: DDP, searching for unused parameters when the model
    says it must (a per-step graph walk the LDM does not pay). Any other choice stays as given."""
    strategy = trainer.get("strategy", AUTO)
    world = (_device_count(trainer.get("devices")) or 1) * int(trainer.get("num_nodes") or 1)
    if _is(strategy, "ddp") or (_is(strategy, AUTO) and world > 1):
        return "ddp_find_unused_parameters_true" if find_unused else "ddp"
    return strategy


def _resolve_speed(callbacks: DictConfig, on_cuda: bool) -> None:
    """Off CUDA no speed switches (GPUSpeed would leave them off anyway; the logged config then says so). On
    CUDA, `speed=auto` (a node naming the option to use) becomes that option's switches, keeping keys given
    next to the marker (`+callbacks.speed.compile=regional`); an explicit speed=gpu / speed=none stays."""
    node = callbacks.get("speed")
    if not on_cuda:
        callbacks.speed = None
    elif isinstance(node, DictConfig) and SPEED_MARKER in node:
        extra = {k: v for k, v in node.items() if k != SPEED_MARKER}
        option = OmegaConf.load(CONF_DIR / "speed" / f"{node[SPEED_MARKER]}.yaml")  # no defaults list to compose
        callbacks.speed = OmegaConf.merge(option, extra)
