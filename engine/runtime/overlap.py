"""Device rows to archive rows, with the writing overlapped with the next forward.

`to_host(step)` encodes one step's logits on the device and starts one copy of everything the
writer needs into pinned host memory (`non_blocking=True`, then a CUDA event); nothing waits
for it.  `Overlap` runs the archive writer on a background thread fed through a bounded queue
(`depth` steps), so forward t+1 runs on the GPU while step t is encoded, copied and written,
and host memory stays flat whatever the run's length.  On the CPU the tensors are already on
the host and the thread still overlaps HDF5 writes with compute where the GIL allows.

`threaded=False` runs the same code inline: archives are identical either way
(tests/test_gpu_ready.py).

Interrupts: on KeyboardInterrupt the main thread calls `close(abort=True)`; batches whose
rows were all queued are still written and committed, the batch in flight is dropped before
its commit, so resume continues exactly where the file says.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine import archive
from engine.runtime.encode import encode, to_numpy
from engine.runtime.sampling import Step

_END = object()  # end of one batch's rows
_STOP = object()  # no more batches (after an interrupt: the batch in flight is dropped)


class _Dropped(Exception):
    """The batch in flight ends without its commit (interrupt)."""


@dataclass
class HostStep:
    """One step's encoded rows on their way to the host."""

    t: int
    codec: str
    parts: dict  # name -> tensor on the host (pinned while a CUDA copy may be running) or None
    ready: object  # torch.cuda.Event recorded after the copies, or None
    tokens: np.ndarray
    alive: np.ndarray
    nonfinite: np.ndarray | None

    def rows(self) -> archive.Rows:
        """Wait for this step's copies (not for later work), then the writer's `Rows`."""
        if self.ready is not None:
            self.ready.synchronize()
        p = self.parts
        host = lambda x: None if x is None else x.numpy()
        return archive.Rows(
            t=self.t,
            data=to_numpy(self.codec, p["data"]),
            tokens=self.tokens,
            alive=self.alive,
            scale=host(p["scale"]),
            offset=host(p["offset"]),
            acts={k[4:]: v.numpy() for k, v in p.items() if k.startswith("act:")},
            extras={k[4:]: v.numpy() for k, v in p.items() if k.startswith("ext:")},
            nonfinite=self.nonfinite,
        )


def to_host(st: Step, codec: str, window: float) -> HostStep:
    """Encode on the device and start the step's copies to the host; returns at once."""
    data, scale, offset = encode(codec, st.logits, window)
    if data.device.type == "cpu" and data.untyped_storage().nbytes() > data.nbytes:
        # fp32 on the CPU encodes to a view: a teacher-forced step is a slice of the batch's
        # whole [batch, L + 1, vocab] logits, which a queued view would keep alive through the
        # next batch's forward; the step's own copy lets it go (memory stays one batch)
        data = data.clone()
    parts = {
        "data": data,
        "scale": scale,
        "offset": offset,
        **{f"act:{k}": a.float() for k, a in st.acts.items()},
        **{f"ext:{k}": a.contiguous() for k, a in st.extras.items()},
    }
    ready = None
    if data.device.type == "cuda":
        parts = {
            k: None
            if v is None
            else torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
            for k, v in parts.items()
        }
        ready = torch.cuda.Event()
        ready.record()
    return HostStep(st.t, codec, parts, ready, st.tokens, st.alive, st.nonfinite)


def encoded(steps: Iterable[Step], codec: str, window: float) -> Iterator[archive.Rows]:
    """Torch steps -> the writer's host-side `Rows`, one after another (no thread)."""
    for st in steps:
        yield to_host(st, codec, window).rows()


class Overlap:
    """Runs `consume(rows)` jobs, one per batch, on a writer thread (or inline)."""

    def __init__(self, threaded: bool = True, depth: int = 4):
        self.threaded = threaded
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._work, name="archive-writer", daemon=True)
            self._thread.start()

    def batch(
        self, consume: Callable[[Iterator[archive.Rows]], None], steps: Iterable[HostStep]
    ) -> None:
        """Hand one batch's steps to `consume` (the archive writer's `write_batch`)."""
        if not self.threaded:
            consume(s.rows() for s in steps)
            return
        self._put(consume)
        for s in steps:
            self._put(s)
        self._put(_END)

    def drain(self) -> None:
        """Block until every batch handed over so far is written and committed."""
        if not self.threaded:
            return
        done = threading.Event()

        def mark(rows):
            for _ in rows:
                pass
            done.set()

        self.batch(mark, ())
        while not done.wait(0.2):
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise RuntimeError("the archive writer thread stopped") from self._error

    def close(self, abort: bool = False) -> None:
        """Wait until every queued batch is written; with abort, drop the batch in flight."""
        if not self.threaded or self._thread is None:
            return
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
        self._thread = None
        if self._error is not None and not abort:
            raise self._error

    # ---- writer thread ------------------------------------------------------------------------
    def _rows(self) -> Iterator[archive.Rows]:
        while (item := self._q.get()) is not _END:
            if item is _STOP:
                raise _Dropped
            yield item.rows()

    def _work(self) -> None:
        while (job := self._q.get()) is not _STOP:
            try:
                job(self._rows())
            except _Dropped:
                return
            except BaseException as exc:  # handed to the main thread at its next put/close
                self._error = exc
                return

    def _put(self, item) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise RuntimeError("the archive writer thread stopped") from self._error


@contextlib.contextmanager
def overlapped(threaded: bool = True):
    """An `Overlap` for one run's batches: on leaving, every queued batch is written; when the
    block raises (an interrupt, an error), complete batches are still committed and the one
    in flight is dropped before its commit."""
    pipe = Overlap(threaded=threaded)
    try:
        yield pipe
    except BaseException:
        pipe.close(abort=True)
        raise
    pipe.close()
