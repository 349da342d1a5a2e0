"""Shared entry-point behaviour: user errors become one line on stderr and exit status 2."""

from __future__ import annotations

import contextlib
import sys

from omegaconf.errors import OmegaConfBaseException

from engine.errors import EngineError


@contextlib.contextmanager
def user_errors():
    try:
        yield
    except (EngineError, OmegaConfBaseException) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (a dump continues with resume=true)", file=sys.stderr)
        sys.exit(130)


def check_group_choices(args: list[str], groups: tuple[str, ...]) -> None:
    """Exit with one line when a `group=option` override names no conf/<group>/<option>.yaml
    (Hydra would print a multi-line report).  Overrides are read with Hydra's own parser, so
    sweeps (`a,b`, `choice(a,b)`, `glob(*)`) are checked option by option; syntax errors are
    left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from engine.config import options

    parser = OverridesParser.create()
    for arg in args:
        name, eq, _ = arg.partition("=")
        group = name.lstrip("+~")
        if not eq or group not in groups:
            continue
        try:
            ov = parser.parse_override(arg)
        except Exception:  # Hydra reports its own syntax errors
            continue
        available, value = options(group), ov.value()
        if isinstance(value, Glob):
            if not value.filter(available):
                _die(f"no {group} matches {arg.partition('=')[2]}; available: {', '.join(available)}")
            continue
        values = list(ov.sweep_string_iterator()) if ov.is_sweep_override() \
            else [ov.get_value_element_as_str()]
        bad = [v for v in values if v not in available]
        if bad:
            _die(f"unknown {group} {bad[0]!r}; available: {', '.join(available)}")


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)
