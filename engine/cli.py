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
    (Hydra would print a multi-line report)."""
    from engine.config import options

    for arg in args:
        name, eq, value = arg.partition("=")
        group = name.lstrip("+~")
        if eq and group in groups:
            bad = [v for v in value.split(",") if v not in options(group)]  # multirun: a,b
            if bad:
                print(f"error: unknown {group} {bad[0]!r}; available: {', '.join(options(group))}",
                      file=sys.stderr)
                sys.exit(2)
