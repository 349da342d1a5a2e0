"""Where a model group's logit rows lie in files, for streaming them at the disk's and the
kernels' speed rather than HDF5's: readahead advice for the next chunks, and zero-copy views
of uncompressed chunks.  No torch.

Both find a chunk through HDF5's own chunk index (`get_chunk_info_by_coord`: byte offset and
size of chunk (sample, t0, 0)), in the archive itself or, for a merged archive's virtual
logits, in each shard file (`sources`).  Chunks are (1, k, V): one sample's k steps of full
rows, contiguous in the file when uncompressed (docs/archive-format.md, "Chunking").
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
from pathlib import Path

import h5py
import numpy as np

from engine.archive.handle import open_h5

#: a mapping's pages already read are released in windows of this size (`Mapped`)
RELEASE_BYTES = 64 << 20


def sources(ds: h5py.Dataset) -> list[tuple[int, int, Path, str]]:
    """(first sample, end sample, file, dataset name) of every file holding `ds`'s rows."""
    if not ds.is_virtual:
        return [(0, ds.shape[0], Path(ds.file.filename), ds.name)]
    here = Path(ds.file.filename).parent
    out = []
    for v in ds.virtual_sources():
        lo, hi = v.vspace.get_select_bounds()
        out.append((lo[0], hi[0] + 1, here / v.file_name, v.dset_name))
    return out


class _Chunks:
    """The chunk index of every source, opened once: `locate(sample, t)` -> (part, offset,
    size) of the chunk holding step t, or None (chunk not allocated, sample not covered)."""

    def __init__(self, ds: h5py.Dataset, k: int, usable=lambda d: True):
        self.k, self.parts, self.files = k, [], []
        for lo, hi, path, name in sources(ds):
            f = open_h5(path, "r") if ds.is_virtual else None
            src = f[name] if f is not None else ds
            if f is not None:
                self.files.append(f)
            if not src.chunks or not usable(src):
                self.close()
                return
            self.parts.append((lo, hi, src.id, path))

    def locate(self, sample: int, t: int):
        for i, (lo, hi, dsid, _) in enumerate(self.parts):
            if lo <= sample < hi:
                info = dsid.get_chunk_info_by_coord((sample - lo, t - t % self.k, 0))
                return None if info.byte_offset is None else (i, info.byte_offset, info.size)
        return None

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.parts, self.files = [], []


class Readahead:
    """Asks the OS to start reading the chunks of the next blocks (POSIX_FADV_WILLNEED) while
    the current block is being computed on, so a cold archive streams at the larger of disk
    and kernel time per block rather than their sum.  The advice is given on a helper thread:
    the call blocks while the request is queued on the device (about 0.6 ms per 2 MiB chunk
    on our disk), which would otherwise stall the reading thread.  Advice only: where the OS
    has no posix_fadvise it does nothing."""

    def __init__(self, ds: h5py.Dataset, k: int):
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.thread, self.fds = None, []
        if not hasattr(os, "posix_fadvise"):
            self.chunks = None
            return
        self.chunks = _Chunks(ds, k)
        self.fds = [os.open(path, os.O_RDONLY) for *_, path in self.chunks.parts]
        self.thread = threading.Thread(target=self._advise, daemon=True)
        self.thread.start()

    def _advise(self) -> None:
        while (job := self.todo.get()) is not None:
            os.posix_fadvise(*job, os.POSIX_FADV_WILLNEED)

    def __call__(self, sample: int, t0: int, t1: int) -> None:
        """Request the chunks holding steps t0..t1-1 of `sample`."""
        if self.chunks is None:
            return
        for t in range(t0 - t0 % self.chunks.k, t1, self.chunks.k):
            where = self.chunks.locate(sample, t)
            if where is not None:
                self.todo.put((self.fds[where[0]], where[1], where[2]))

    def close(self) -> None:
        if self.thread is not None:
            self.todo.put(None)
            self.thread.join()
            self.thread = None
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.chunks is not None:
            self.chunks.close()


class Mapped:
    """Zero-copy rows: an uncompressed chunk's bytes viewed in place through a private,
    read-only-in-practice memory map of its file (no HDF5 read, no copy into a buffer: the
    kernels read the page cache directly, and a cold file is paged in with the kernel's own
    sequential readahead).  Pages of the previous block are released from the mapping
    (MADV_DONTNEED, the page cache keeps them) so the process's resident set stays one block
    however much it streams; an array still held by a caller re-reads its pages on access.

    `rows` gives None (the caller reads through HDF5) for compressed or non-native-endian
    logits, a block spanning two chunks, or an unallocated chunk."""

    def __init__(self, ds: h5py.Dataset, k: int):
        V, self.dtype, self.maps, self.last = ds.shape[-1], ds.dtype, [], None
        self.row_bytes = V * ds.dtype.itemsize

        def usable(src):
            return (
                src.id.get_create_plist().get_nfilters() == 0
                and src.dtype.isnative
                and src.chunks == (1, k, V)
            )

        self.chunks = _Chunks(ds, k, usable)
        for *_, path in self.chunks.parts:
            with open(path, "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))

    def rows(self, sample: int, t0: int, t1: int) -> np.ndarray | None:
        """[t1 - t0, vocab] view of steps t0..t1-1 of `sample`, or None."""
        if not self.maps or t0 // self.chunks.k != (t1 - 1) // self.chunks.k:
            return None
        where = self.chunks.locate(sample, t0)
        if where is None:
            return None
        part, offset, _ = where
        start = offset + (t0 % self.chunks.k) * self.row_bytes
        self._release(part, start)
        return np.frombuffer(
            self.maps[part], self.dtype, (t1 - t0) * self.row_bytes // self.dtype.itemsize, start
        ).reshape(t1 - t0, -1)

    def _release(self, part: int, start: int) -> None:
        """Unmap the pages read since the last release once they reach RELEASE_BYTES (one
        madvise per window: releasing every block costs more than it saves)."""
        if self.last is None or self.last[0] != part or start < self.last[1]:
            self.last = (part, start - start % mmap.PAGESIZE)
            return
        lo = self.last[1]
        hi = start - start % mmap.PAGESIZE
        if hi - lo >= RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            self.maps[part].madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            self.last = (part, hi)

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a caller still holds a block: the map goes with it
                pass
        self.maps = []
        self.chunks.close()
