"""The one exception type for bad user input and unusable files, and what an interrupt says.

Entry points catch EngineError and print a single line on stderr (no traceback) before exiting
with status 2; everything else is a bug and keeps its traceback.  The run layer records, once
it has a file, the command that continues it (`on_interrupt`); the entry points print that on
Ctrl-C.
"""

_ADVICE: list[str] = []  # what to tell the user if interrupted now (set once a file exists)


def on_interrupt(advice: str | None) -> None:
    """What an interrupt from here on should print (None: nothing was written)."""
    _ADVICE[:] = [advice] if advice else []


def interrupt_advice() -> str | None:
    return _ADVICE[0] if _ADVICE else None


class EngineError(ValueError):
    """User-facing error: bad configuration, missing file, incompatible archive."""
