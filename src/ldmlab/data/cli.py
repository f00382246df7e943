"""`key=value` command-line arguments (Hydra's style) parsed into a dataclass with OmegaConf's type checks."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def usage(schema: type, doc: str) -> str:
    """`doc` and one line per field: name, default, help (from the field's metadata)."""
    lines = [doc.strip(), "", "arguments (key=value):"]
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "(required)" if default == MISSING else f"= {default}"
        lines.append(f"  {f.name:<14} {shown:<14} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def split_args(schema: type, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(arguments that are fields of `schema`, the rest) — the rest go to Hydra in cache_latents."""
    names = {f.name for f in dataclasses.fields(schema)}
    mine = [a for a in argv if a.split("=", 1)[0] in names]
    return mine, [a for a in argv if a not in mine]


def parse_args(schema: type[T], argv: Sequence[str], doc: str) -> T:
    """`key=value` arguments into a `schema` instance; `--help` prints usage; errors exit with one line."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(schema, doc))
        sys.exit(0)
    loose = [a for a in argv if "=" not in a]
    if loose:
        sys.exit(f"error: arguments are key=value (Hydra style), got {loose[0]!r}; see --help")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as e:
        sys.exit(f"error: {str(e).splitlines()[0]}; see --help")
    missing = sorted(OmegaConf.missing_keys(conf))
    if missing:
        sys.exit(f"error: missing required argument(s) {', '.join(k + '=...' for k in missing)}; see --help")
    return OmegaConf.to_object(conf)


def parse_size(text: str | int | None) -> int | None:
    """'500M' / '2G' / '4096' → bytes (powers of 1000, as disks and object stores count)."""
    if text is None or isinstance(text, int):
        return text
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = text.strip().upper().removesuffix("B")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix, e.g. 500M") from None
