"""The one exception type for bad user input and unusable files.

Entry points catch it and print a single line on stderr (no traceback) before exiting
with status 2; everything else is a bug and keeps its traceback.
"""


class EngineError(ValueError):
    """User-facing error: bad configuration, missing file, incompatible archive."""
