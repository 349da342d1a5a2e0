"""Writing /layer_pairs/<base>~<aligned> (format version 6): two models' logit lenses compared
per [sample, step, layer pair], in place in a complete archive, the way `score` adds a model
group: created at full size with every chunk allocated, rows written per batch with their
checksums, the group's own `n_complete` rewritten after each batch (resume=true continues),
`complete` set at the end.  Written by `python -m engine layers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from engine.archive import checksums
from engine.archive import format as F
from engine.archive.handle import FileHandle, open_h5
from engine.archive.writer import _early
from engine.errors import EngineError


def group_name(base: str, aligned: str) -> str:
    return f"{base}{F.LAYER_PAIR_SEP}{aligned}"


def open_group(
    path: Path,
    *,
    base: str,
    aligned: str,
    layers_base,
    layers_aligned,
    depth_base: int,
    depth_aligned: int,
    pairing: str,
    key: dict,
    resume: bool,
    overwrite: bool,
) -> tuple[LayerPairWriter, bool]:
    """(writer, resuming) for /layer_pairs/<base>~<aligned> of the complete archive `path`:
    continue a partial group started with the same `key` (resume), replace one (overwrite),
    or create it."""
    if pairing not in F.PAIRINGS:
        raise ValueError(f"pairing must be one of {F.PAIRINGS}, got {pairing!r}")
    name = f"{F.LAYER_PAIRS}/{group_name(base, aligned)}"
    f = open_h5(path, "r+")
    try:
        total, steps = f[F.SAMPLES]["tokens"].shape
        g, resuming = f.get(name), False
        if g is not None:
            if overwrite:
                del f[name]
            elif bool(g.attrs["complete"]):
                raise EngineError(
                    f"the archive already has layer pairs {group_name(base, aligned)!r}; pass "
                    f"overwrite=true to replace them"
                )
            elif not resume:
                raise EngineError(
                    f"layer pairs {group_name(base, aligned)!r} were partly written "
                    f"({int(g.attrs['n_complete'])} samples): pass resume=true to continue or "
                    f"overwrite=true to restart"
                )
            elif json.loads(g.attrs["key"]) != json.loads(json.dumps(key, sort_keys=True)):
                raise EngineError(
                    f"cannot resume layer pairs {group_name(base, aligned)!r}: they were "
                    f"started with different settings; use overwrite=true"
                )
            else:
                resuming = True
        if not resuming:
            g = f.create_group(name)
            a = g.attrs
            a["base"], a["aligned"], a["pairing"] = base, aligned, pairing
            a["layers_base"] = np.asarray(layers_base, np.int32)
            a["layers_aligned"] = np.asarray(layers_aligned, np.int32)
            a["depth_base"], a["depth_aligned"] = np.int64(depth_base), np.int64(depth_aligned)
            a["key"] = json.dumps(key, sort_keys=True)
            a["n_complete"], a["complete"] = np.int64(0), np.int8(0)
            shape = (total, steps, len(layers_base))
            for stat in F.LAYER_PAIR_STATS:
                _early(g, stat, shape, np.float32, chunks=(1, max(1, steps), shape[2]))
            checksums.create(g, total, list(F.LAYER_PAIR_STATS), _early)
            f.flush()
        return LayerPairWriter(f[name]), resuming
    except BaseException:
        f.close()
        raise


class LayerPairWriter(FileHandle):
    """Writes one batch of [sample, step, pair] statistics at a time, then commits it."""

    def __init__(self, group: h5py.Group):
        self.g, self.f = group, group.file

    @property
    def n_complete(self) -> int:
        return int(self.g.attrs["n_complete"])

    def write(self, s0: int, stats: dict, length: np.ndarray) -> None:
        """`stats`: name -> [n, T, pair] float32 for samples s0..s0+n-1; steps at or beyond a
        sample's length are stored as zeros (padding)."""
        n = len(length)
        pad = np.arange(self.g[F.LAYER_PAIR_STATS[0]].shape[1])[None, :] >= length[:, None]
        held = {}
        for name in F.LAYER_PAIR_STATS:
            a = np.ascontiguousarray(stats[name], dtype=np.float32)
            a[pad] = 0
            self.g[name][s0 : s0 + n] = a
            held[name] = a
        digests = np.array(
            [
                [checksums.digest(held[c][i, : length[i]]) for c in F.LAYER_PAIR_STATS]
                for i in range(n)
            ],
            dtype=np.uint64,
        ).reshape(n, len(F.LAYER_PAIR_STATS))
        self.g[F.CHECKSUMS][s0 : s0 + n] = digests

    def commit(self, n_complete: int) -> None:
        self.f.flush()
        self.g.attrs.modify("n_complete", np.int64(n_complete))
        self.f.flush()

    def finish(self) -> None:
        self.g.attrs.modify("complete", np.int8(1))
        self.f.flush()
