"""Timing, ceilings and the environment line shared by the GPU benchmarks (bench.gpu and its parts)."""

from __future__ import annotations

import datetime as dt
import gc
import importlib.metadata as md
import platform
import time
from collections.abc import Callable

import torch

DATASHEET_TFLOPS = 989.0  # H100 SXM dense bf16


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on a machine without CUDA: CPU rehearsals)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_seconds(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean seconds per call of `fn` on the GPU (CUDA events), after `warmup` calls; wall-clock seconds on a
    machine without CUDA (CPU rehearsals of a GPU benchmark)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def timed_warmup(fn: Callable[[], object], calls: int = 3) -> float:
    """Wall seconds of the first `calls` calls (compilation included): the warm-up a user waits for."""
    synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return time.perf_counter() - t0


def matmul_ceiling(n: int = 8192, iters: int = 50) -> float:
    """Measured dense bf16 matmul throughput (TFLOP/s): the practical ceiling for MFU."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / cuda_seconds(lambda: a @ b, iters, warmup=5) / 1e12


def free_gpu() -> None:
    """Release the previous case's models and optimizer state before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # compiled graphs of the previous case hold their own buffers


def peak_gib() -> float:
    """Peak GPU memory allocated since the last reset (NaN without CUDA: the CPU has no such counter)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def environment() -> str:
    """`date, device, versions` for the tables' headings."""
    versions = [f"torch {torch.__version__}"]
    for pkg in ("diffusers", "pytorch-lightning"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{dt.date.today()}, {device}, {', '.join(versions)}, Python {platform.python_version()}"
