"""Collectives for metric state: float64 sums, row gathers with uneven counts per rank, one result for all.

Every function is a no-op (returns its input) when torch.distributed is not initialised or has one rank, so the
metrics run unchanged in a plain script. The ranks must call them together, in the same order.
`ldmlab.utils.distributed.gather_per_rank` pickles whole objects (`all_gather_object`); features are large
tensors, so here they travel as tensors, padded to the largest count (all_gather needs equal shapes).
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective's tensors must live: the GPU for NCCL, the CPU for gloo, else where they are."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return t.device  # e.g. "cpu:gloo,cuda:nccl" picks the backend by the tensor's device


def all_reduce_sum(t: Tensor) -> Tensor:
    """The elementwise sum of `t` over all ranks (a new tensor on `t`'s device; `t` is left as it is)."""
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device(t), copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's rows (rank 0's first), `x` of shape (n_rank, ...) with n_rank free per rank.

    all_gather needs equal shapes: each rank pads to the largest count and the padding is cut off again.
    The trailing shape and the dtype must agree over ranks (a rank with no rows passes shape (0, ...)).
    """
    if not is_distributed():
        return x
    dist, device = torch.distributed, _comm_device(x)
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = x.detach().new_zeros((max(sizes), *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (picklable objects; the others may pass None)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
