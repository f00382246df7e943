"""Where a training step's GPU time goes: kernels grouped by kind (torch.profiler), and the GPU's idle share."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# first match wins: cuDNN's attention kernels also contain "cudnn", its conv kernels contain "gemm"
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_mha|softmax")),
    ("optimizer", re.compile(r"adam|multi_tensor")),
    ("conv", re.compile(r"conv|implicit|dgrad|wgrad|fprop|xmma|nhwc|nchw")),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|cublas|matmul|sm90_|sm80_")),
    ("fused (triton)", re.compile(r"triton")),
    ("norm", re.compile(r"norm|welford")),
    ("copy / cast / cat", re.compile(r"copy|cat|cast|transpose|permute|to_dtype")),
]


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "elementwise / other")


def profile_step(step: Callable[[], None], steps: int = 3) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    """(ms per step by category, top kernels in ms per step, wall ms per step) over `steps` steps."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    by_kind, kernels = kernel_times(prof, steps)
    return by_kind, kernels, wall_ms


def kernel_times(prof: profile, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """GPU ms per step by category and the top 25 kernels, from a finished profiler."""
    by_kind: dict[str, float] = defaultdict(float)
    kernels: list[tuple[str, float]] = []
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA or _is_range(event):
            continue
        ms = event.self_device_time_total / 1e3 / steps
        by_kind[category(event.key)] += ms
        kernels.append((event.key, ms))
    kernels.sort(key=lambda kv: -kv[1])
    return dict(by_kind), kernels[:25]


def _is_range(event: object) -> bool:
    """A named range on the GPU timeline (record_function, Lightning's hooks via HookRanges), not a kernel:
    counting it would count its kernels twice."""
    key = event.key
    return bool(getattr(event, "is_user_annotation", False)) or "#" in key or key.startswith(("[", "##")) \
        or key in ("run_training_batch", "Torch-Compiled Region", "CompiledFunction")


def host_times(prof: profile, steps: int, top: int = 30) -> list[tuple[str, float, float]]:
    """(name, total CPU ms per step, calls per step) of the host ranges and ops that hold the CPU longest:
    where a step whose GPU idles spends its time (Lightning hooks, callbacks, syncs such as cudaMemcpy)."""
    rows = [(e.key, e.cpu_time_total / 1e3 / steps, e.count / steps) for e in prof.key_averages()
            if e.device_type == DeviceType.CPU]
    return sorted(rows, key=lambda r: -r[1])[:top]


def host_report(rows: list[tuple[str, float, float]]) -> str:
    lines = ["| host range / op (inclusive) | CPU ms/step | calls/step |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {ms:.2f} | {calls:g} |" for name, ms, calls in rows]
    return "\n".join(lines) + "\n"


def report(title: str, by_kind: dict[str, float], kernels: list[tuple[str, float]], wall_ms: float) -> str:
    """A Markdown breakdown: share of GPU time per kind, idle share, the top kernels."""
    busy = sum(by_kind.values())
    lines = [f"#### Profile: {title}", "",
             f"Wall {wall_ms:.1f} ms/step, kernels {busy:.1f} ms/step (GPU idle {max(0.0, 1 - busy / wall_ms):.1%}).",
             "", "| kind | ms/step | share |", "|---|---|---|"]
    lines += [f"| {kind} | {ms:.2f} | {ms / busy:.1%} |" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += ["", "| top kernels | ms/step | kind |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {ms:.2f} | {category(name)} |" for name, ms in kernels[:15]]
    return "\n".join(lines) + "\n"


def sdpa_backends(shapes: list[tuple[int, int, int, int, int]], iters: int = 20) -> str:
    """fwd+bwd ms of SDPA per backend at the U-Net's attention shapes (B, heads, L, S, head_dim), bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldmlab.bench.common import cuda_seconds

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    lines = ["| B, heads, L, S, d | " + " | ".join(f"{b} ms" for b in backends) + " |",
             "|---|" + "---|" * len(backends)]
    for b, h, n, s, d in shapes:
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cells = []
        def run(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
            torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

        for backend in backends.values():
            try:
                with sdpa_kernel(backend):
                    cells.append(f"{cuda_seconds(run, iters) * 1e3:.3f}")
            except RuntimeError:
                cells.append("n/a")
        lines.append(f"| {b}, {h}, {n}, {s}, {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
