"""Writing a merged archive (docs/archive-format.md, "Shards and merged archives"): the layout
half of `python -m engine merge`, whose planning, refusals and command line stay in
engine/commands/merge.py.

The merged file has the run's root attributes (no `shard`, `merged_from` added), `/prompts`
and `/samples` of all shards in sample order, and every model group with its small datasets
copied and its per-sample rows either HDF5 virtual datasets over the shard files (paths
relative to the merged file) or copied one sample at a time (`copy`).  A group's `checksums`
are its shards' rows, concatenated in sample order; a copy hashes every sample it copies and
refuses (EngineError) a shard whose bytes do not match them.  Its `self_check` is the first
shard's that has one (the single run's own).  The caller writes to a
`.partial` path and removes it on any error, so a refused merge leaves nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from engine.archive import checksums
from engine.archive import format as F
from engine.archive.handle import open_h5
from engine.archive.reader import Archive, ModelView
from engine.archive.writer import _early
from engine.errors import EngineError

#: per-sample row datasets of a model group, merged (virtually or by copy); the rest is copied
ROWS = ("logits", F.LOGITS_SCALE, F.LOGITS_OFFSET)


def row_datasets(m: ModelView) -> list[str]:
    """Names (relative to the group) of a model group's per-sample row datasets."""
    names = [n for n in ROWS if n in m.group]
    lens = [f"{F.LENS}/{n}" for n in F.LENS_STATS] if m.lens is not None else []
    return names + [f"{F.ACTIVATIONS}/{h}" for h in m.activations] + lens


def write_merged(
    path: Path,
    shards: list[Archive],
    *,
    run_key: dict,
    records: list[dict],
    copy: bool,
    progress: Callable[[int], object] = lambda n: None,
) -> None:
    """Write the merged archive of `shards` (sorted by start, checked by the caller) to
    `path`.  `records` become `merged_from`; `progress(bytes)` is told of every copied logits
    row."""
    with open_h5(path, "w") as f:
        _root(f, shards, run_key, records)
        _samples(f, shards)
        for key in shards[0].models:
            _model_group(f, shards, key, Path(path).parent, copy, progress)
        f.attrs["complete"] = np.int8(1)


def _root(f: h5py.File, shards: list[Archive], run_key: dict, records: list[dict]) -> None:
    """The first shard's root attributes, as the whole run's: its run key, every sample."""
    first, total = shards[0], shards[0].shard.total
    for k, v in first.f.attrs.items():
        if k != F.SHARD:
            f.attrs[k] = v
    f.attrs["run_key"] = json.dumps(run_key, sort_keys=True)
    f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    f.attrs["n_samples"], f.attrs["n_complete"] = total, np.int64(total)
    f.attrs[F.MERGED_FROM] = json.dumps(records)


def _samples(f: h5py.File, shards: list[Archive]) -> None:
    """/prompts (the run's, the same in every shard) and /samples, shards in sample order."""
    first = shards[0]
    first.f.copy(first.f[F.PROMPTS], f.require_group("prompts"), "text")
    s = f.create_group(F.SAMPLES)
    for name in F.SAMPLE_FIELDS:
        src = first.f[F.SAMPLES][name]
        data = np.concatenate([a.f[F.SAMPLES][name][()] for a in shards])
        s.create_dataset(
            name, data=data, dtype=src.dtype, chunks=src.chunks, fillvalue=src.fillvalue
        )


def _model_group(
    f: h5py.File, shards: list[Archive], key: str, out_dir: Path, copy: bool, progress
) -> None:
    """/models/<key>: the first shard's attributes and small datasets, every shard's rows,
    checksums and self-check."""
    m0, total = shards[0].models[key], shards[0].shard.total
    g = f.create_group(f"{F.MODELS}/{key}")
    for k, v in m0.group.attrs.items():
        g.attrs[k] = v
    g.attrs["n_complete"] = np.int64(total)
    rows = row_datasets(m0)
    for name in m0.group:
        if name not in rows and name not in (F.ACTIVATIONS, F.CHECKSUMS, F.LENS):
            shards[0].f.copy(m0.group[name], g, name)
    if m0.lens is not None:  # its attributes; the lens check: the worst of the shards'
        lg = g.create_group(F.LENS)
        for k, v in m0.lens.group.attrs.items():
            lg.attrs[k] = v
        checks = [a.models[key].lens.group.attrs[F.LENS_CHECK] for a in shards]
        lg.attrs[F.LENS_CHECK] = np.max(np.stack(checks), axis=0)
    columns = _checksums(g, shards, key)
    for name in rows:
        src = [a.models[key].group[name] for a in shards]
        if copy:
            ds = _copy_rows(g, name, shards, key, columns, progress)
        else:
            ds = _virtual_rows(g, name, src, shards, out_dir)
        for k, v in src[0].attrs.items():
            ds.attrs[k] = v
        if name == "logits" and src[0].chunks:
            ds.attrs[F.CHUNK_STEPS] = int(src[0].chunks[1])
    _self_check(g, shards, key)


def _virtual_rows(
    g: h5py.Group, name: str, src: list[h5py.Dataset], shards: list[Archive], out_dir: Path
) -> h5py.Dataset:
    """A virtual dataset mapping samples start..stop-1 to each shard's own dataset."""
    shape = (sum(s.shape[0] for s in src), *src[0].shape[1:])
    layout = h5py.VirtualLayout(shape=shape, dtype=src[0].dtype)
    for a, s in zip(shards, src):
        layout[a.shard.start : a.shard.stop] = h5py.VirtualSource(
            os.path.relpath(a.path, out_dir), s.name, shape=s.shape
        )
    return g.create_virtual_dataset(name, layout, fillvalue=src[0].fillvalue)


def _copy_rows(
    g: h5py.Group, name: str, shards: list[Archive], key: str, columns: list[str] | None, progress
) -> h5py.Dataset:
    """A real dataset chunked as the shards', filled one sample at a time (memory: one
    sample's [step, ...] rows), each sample's stored rows checked against its shard's checksum
    before it is written."""
    src = [a.models[key].group[name] for a in shards]
    shape = (sum(s.shape[0] for s in src), *src[0].shape[1:])
    ds = g.create_dataset(
        name, shape=shape, dtype=src[0].dtype, chunks=src[0].chunks, fillvalue=src[0].fillvalue
    )
    col = columns.index(name) if columns and name in columns else None
    for a, s in zip(shards, src):
        m, lengths = a.models[key], a.samples()["length"]
        want = m.checksums(s.shape[0])[:, col] if col is not None else None
        for i in range(s.shape[0]):
            rows = s[i]  # [step, ...] of one sample, C order
            if want is not None and checksums.digest(rows[: int(lengths[i])]) != int(want[i]):
                raise EngineError(
                    f"shard {a.path}: sample {i} (sample {a.shard.start + i} of "
                    f"the run) of model {key!r} does not match its checksum in "
                    f"{name!r}: the shard is damaged (`python -m engine verify "
                    f"{a.path}` lists every damaged sample); nothing was written"
                )
            ds[a.shard.start + i] = rows
            progress(rows.nbytes if name == "logits" else 0)
    return ds


def _checksums(g: h5py.Group, shards: list[Archive], key: str) -> list[str] | None:
    """The group's checksums: the shards' rows in sample order.  None (no checksums) unless
    every shard's group has them, over the same columns (shards of an older engine have none)."""
    columns = [a.models[key].checksum_columns for a in shards]
    if columns[0] is None or any(c != columns[0] for c in columns):
        return None
    ds = checksums.create(g, shards[0].shard.total, columns[0], _early)
    for a in shards:
        ds[a.shard.start : a.shard.stop] = a.models[key].checksums(a.n_samples)
    return columns[0]


def _self_check(g: h5py.Group, shards: list[Archive], key: str) -> None:
    """The merged group's self-check: that of the first shard (in sample order) that recorded
    one, its sample index made the run's, so a merged archive carries the single run's own
    check (shard 0 starts where the run starts); NaN when none did.  Every shard's check is in
    `merged_from`.  Untouched for shards without the slot (before version 5)."""
    if not any(F.SELF_CHECK in a.models[key].group.attrs for a in shards):
        return
    checks = [(c, a.shard.start) for a in shards if (c := a.models[key].self_check) is not None]
    if checks:
        c, start = checks[0]
        g.attrs[F.SELF_CHECK] = F.self_check_value(
            c["sample"] + start, c["steps"], c["max_abs_diff"], c["bound"]
        )
    else:
        g.attrs[F.SELF_CHECK] = F.self_check_value()
