"""The one way the engine replaces a file or folder: write it whole under another name beside
the target, then rename it onto the target (a rename within one filesystem is atomic), so a
reader, a crash or a concurrent run sees the old target or the complete new one, never half.

Used by every archive-writing verb (`engine.runtime.output`), `merge`, the model cache
(`engine.runtime.models`), twin builds and their `latest` pointer (`engine.runtime.builds`,
`engine.commands.align`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def atomic_replace(src: Path, dst: Path, replace_dir: bool = False) -> None:
    """Rename the complete `src` onto `dst`.  A file `dst` is replaced atomically.  A folder
    `dst` cannot be renamed over: with replace_dir=True it is removed first (a moment with
    neither; a reader finds no target and builds or waits, never a mix), else the rename
    fails with OSError (another process completed the same target first)."""
    if replace_dir and Path(dst).is_dir():
        shutil.rmtree(dst)
    os.replace(src, dst)


@contextlib.contextmanager
def staged(dst: Path, partial: Path | None = None, keep: bool = False):
    """Yield the path to write instead of the file `dst`: `partial`, or a fresh name beside
    `dst` (not created: the caller writes it, with the usual permissions).  When the block
    completes it is renamed onto `dst`; when it raises it is removed, or kept (keep=True: a
    run resumes from it)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if partial is None:
        partial = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield partial
    except BaseException:
        if not keep:
            Path(partial).unlink(missing_ok=True)
        raise
    atomic_replace(partial, dst)
