"""Constructor argument checks shared by the networks: one-line ValueErrors naming the argument and the fix.

Each rule is written here once and raised by the constructor that needs it; `ldmlab.validate` checks a config
by building its networks on the meta device, so these are also the config's shape rules (STYLE 18).
"""

from __future__ import annotations

from collections.abc import Sequence


def check_positive(**values: object) -> None:
    """Raise a ValueError naming the first argument that is set (not None) but not a positive integer."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value} must be a positive integer: choose {name} >= 1")


def check_levels(channel_mult: Sequence[int], levels_name: str, levels: Sequence[int]) -> None:
    """Channel multipliers are positive integers, and `levels` (attention levels) index them."""
    if len(channel_mult) == 0:
        raise ValueError("channel_mult=[] is empty: give one multiplier per resolution level, e.g. [1, 2, 4, 4]")
    for i, m in enumerate(channel_mult):
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"channel_mult[{i}]={m} must be a positive integer: use multipliers such as 1, 2, 4")
    for level in levels:
        if not isinstance(level, int) or not 0 <= level < len(channel_mult):
            raise ValueError(f"{levels_name}={list(levels)} contains {level}, but channel_mult has only "
                             f"{len(channel_mult)} levels: use level indices 0..{len(channel_mult) - 1}")


def check_groups(widths: dict[str, int], norm_groups: int) -> None:
    """GroupNorm splits each width into `norm_groups` equal groups (`widths`: what sets it -> channel count)."""
    for name, channels in widths.items():
        if channels % norm_groups:
            raise ValueError(f"{name}={channels} is not divisible by norm_groups={norm_groups}: GroupNorm needs "
                             f"equal groups; choose norm_groups dividing it (e.g. {_divisor(channels)}) or a "
                             "multiple of norm_groups")


def check_dropout(dropout: float) -> None:
    """A dropout probability in [0, 1)."""
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is outside [0, 1): use a probability such as 0.0 or 0.1")


def _divisor(channels: int, most: int = 32) -> int:
    """The largest divisor of `channels` up to `most` (SD's 32 groups when it divides)."""
    return max(d for d in range(1, most + 1) if channels % d == 0)
