"""The one context-manager shape of everything in this package that holds an open HDF5 file,
and the one way it opens one."""

from __future__ import annotations

import h5py

from engine.errors import EngineError


def open_h5(path, mode: str, **kw) -> h5py.File:
    """h5py.File(path, mode), where a file another process holds open for writing (HDF5 locks
    it: a reader is refused while a writer has it, a writer while anyone has it) is one clear
    line instead of errno 11; every other OSError is the caller's to explain."""
    try:
        return h5py.File(path, mode, **kw)
    except BlockingIOError as exc:
        raise EngineError(
            f"{path} is open in another process (HDF5 locks a file while it is written): "
            f"wait until that process ends, or write another file"
        ) from exc


class FileHandle:
    """Closes `self.f` (an h5py.File) on `close()` and at the end of a `with` block."""

    f = None

    def close(self) -> None:
        if self.f is not None and self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
