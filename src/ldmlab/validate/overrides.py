"""The command line, checked before `hydra.main` parses it: Hydra's own errors there name neither the config
field nor the fix (`model=unet_foo` gives a multi-line listing; `data.train_urls=/x/{000..009}.tar` gives
`mismatched input '{' expecting <EOF>`)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldmlab.configs import CONF_DIR as CONF

# Hydra flags that choose another config tree: the group check then stands aside
CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


def _choices(override: Any) -> list[str]:
    """The option names one parsed override selects (a sweep selects several; null selects none)."""
    if override.is_choice_sweep():
        try:
            return list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001  # glob(...) sweeps need Hydra's config loader: let Hydra check them
            return []
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None]


def quoting_problem(parser: Any, arg: str) -> list[str]:
    """An override whose value Hydra's grammar rejects unquoted (`{`, `(`, ...) but takes quoted: say how."""
    key, value = arg.split("=", 1)
    if not value or value[0] in "[{(" or ('"' in value and "'" in value):
        return []  # a list, dict or call gone wrong, not a path or prompt: Hydra's own message says where
    quote = "'" if '"' in value else '"'
    quoted = f"{key}={quote}{value}{quote}"
    try:
        parser.parse_override(quoted)
    except Exception:  # noqa: BLE001  # quoting does not help: Hydra's own message says where
        return []
    return [(f"{key}={value}: Hydra reads characters such as {{ }} ( ) in an unquoted override value as its own "
            f"syntax; quote the value inside the override: {shlex.quote(quoted)}")]


def override_problems(args: Sequence[str], conf_dir: Path = CONF) -> list[str]:
    """Values Hydra cannot parse unquoted, and `group=option` overrides without conf/<group>/<option>.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, problems = OverridesParser.create(), []
    other_tree = any(a.split("=")[0] in CONFIG_FLAGS for a in args)
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001  # a syntax error
            problems += quoting_problem(parser, arg)
            continue
        group = override.key_or_group
        if other_tree or override.is_delete() or override.is_hydra_override() or not (conf_dir / group).is_dir():
            continue
        valid = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        listed = ", ".join(valid) or "(none)"
        problems += [f"{group}={choice}: no such option in conf/{group}/; valid: {listed}"
                     for choice in _choices(override) if choice not in valid]
    return problems


def exit_on_bad_overrides(conf_dir: Path = CONF, argv: Sequence[str] | None = None) -> None:
    """Exit with one line per bad override, before `hydra.main` prints its multi-line error."""
    if problems := override_problems(sys.argv[1:] if argv is None else argv, conf_dir):
        sys.exit("\n".join(problems))
