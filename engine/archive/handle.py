"""The one context-manager shape of everything in this package that holds an open HDF5 file."""

from __future__ import annotations


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
