"""The one place ldmlab unpickles a weights file: `torch.load(weights_only=True)`, refusals in one line.

A `.ckpt`/`.pt`/`.pth`/`.bin` file is a pickle, and a pickle can name any callable to run while it loads
(`__reduce__` → `os.system`). `weights_only=True` lets through only tensors, containers and primitives; the
weights-only unpickler rejects anything else before calling it. Passing it explicitly also beats
`TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`, which flips only the *default*. safetensors files cannot hold code.

Lives in `nn/` (imports torch only) because LPIPS, a pure module, reads its backbone through it too.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A pickle that would import or call something other than tensors and plain containers."""


def refusal(path: str | Path, error: Exception) -> str:
    """The one-line message for a file the weights-only unpickler refused (names what it would have called)."""
    found = _GLOBAL.search(str(error))
    what = f"it would call {found.group(1)}" if found else "it holds objects other than tensors"
    return (f"{path} is not a weights-only checkpoint: refusing to unpickle code ({what}); load it only if you "
            "trust it: re-save its tensors once, e.g. torch.save(torch.load(path, weights_only=False)['state_dict'], "
            "'clean.ckpt') or as safetensors, and give that file")


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)`; a pickle that would run code raises UnsafeCheckpointError.

    `mmap=True` maps tensor storages instead of reading them (cheap: used to inspect a file before a run);
    files in torch's legacy (pre-zip) format are then read normally.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():  # a corrupt file, not a refused global: torch's message
            raise
        raise UnsafeCheckpointError(refusal(path, error)) from None
    except RuntimeError as error:
        if mmap and "mmap" in str(error):  # legacy format cannot be mapped
            return load_weights_only(path, map_location)
        raise
