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
