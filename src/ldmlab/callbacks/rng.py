"""RNGState: the global random generators of training continue across a resume as if it never happened.

Lightning checkpoints hold no RNG state, yet training draws from the global generators (the VAE posterior
sample, the frozen VAE's sample in the LDM, dropout). And between two steps other code draws too: validation,
image logging, a DataLoader creating its iterator (it takes a base seed from torch's generator), and, on resume,
the fresh model's init and the sanity check. So this callback snapshots torch (CPU and CUDA), numpy and python
`random` at the end of every training batch and sets them back at the start of the next one: training steps
see one stream, whatever runs between them. The snapshot goes into every checkpoint, one per rank.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ldmlab.utils.distributed import gather_per_rank, this_rank

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The global RNG states, in types `torch.load(weights_only=True)` reads back (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Set the global RNGs to `state` (from `rng_states`)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(pl.Callback):
    """Set the global RNGs at each train batch start to their state at the previous batch's end; checkpoint it."""

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None
        self._in_batch = False  # between on_train_batch_start and our on_train_batch_end

    @property
    def state_key(self) -> str:
        return "RNGState"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._snapshot is not None:
            set_rng_states(self._snapshot)
        self._in_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._snapshot, self._in_batch = rng_states(), False

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint written in on_train_batch_end by a callback that runs before this one: the step is over,
        # so its end state is the current one.
        if self._in_batch or self._snapshot is None:
            self._snapshot = rng_states()
        return {"per_rank": gather_per_rank(self._snapshot)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_rank"]
        rank = this_rank()
        if rank >= len(states):
            log.warning("the checkpoint has RNG states of %d ranks; rank %d continues rank %d's", len(states), rank,
                        rank % len(states))
        self._snapshot = states[rank % len(states)]
