"""`python -m engine merge OUT SHARD... [--copy] [--overwrite]`: join the shards of a sharded
dump (`dump shard=i num_shards=n`) into one archive that every reader opens as one dump.

By default the per-sample rows (`logits`, q16 `logits_scale`/`logits_offset`, `activations`)
of OUT are HDF5 virtual datasets over the shard files: nothing is copied, and the shards must
stay where they are relative to OUT (the reader refuses, with one line, a merged archive whose
shard is missing or changed size: HDF5 itself would read zeros).  `--copy` writes a
self-contained file instead, one sample at a time, each checked against its shard's checksum
(a damaged shard is refused).  Everything small (prompts, `/samples`, tokenizer records,
provenance, checksums) is copied either way.  This module plans and refuses; the layout is
written by the archive package (`engine.archive.merged`).

Refused with one line, writing nothing: a shard still `.partial` or incomplete, a file that
is not a shard, shards of different runs (run keys differ beyond the shard's own index),
overlapping or missing samples, model groups that differ between shards.  Provenance: root
attribute `merged_from` records every shard (path, bytes, sha256, host, created, git commit,
device and self-check of each model group).  OUT is written as `OUT.partial` and renamed when complete; an
interrupted merge leaves nothing (run it again: the shards are untouched).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from engine.archive import Archive, write_merged
from engine.archive import format as F
from engine.cli import user_errors
from engine.errors import EngineError
from engine.files import staged
from engine.runtime.provenance import sha256_file


def expand(patterns: list[str]) -> list[Path]:
    """Shard paths from arguments that may be globs (quoted, so the shell leaves them)."""
    paths: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat))) if glob.has_magic(pat) else [pat]
        if not hits:
            raise EngineError(f"no file matches {pat}")
        paths += [Path(h).resolve() for h in hits]
    if len(set(paths)) != len(paths):
        raise EngineError("a shard is given twice")
    return paths


def open_shards(paths: list[Path]) -> list[Archive]:
    shards = []
    try:
        for p in paths:
            if p.name.endswith(".partial") or (
                not p.exists() and p.with_name(p.name + ".partial").exists()
            ):
                raise EngineError(
                    f"shard {p} is still .partial: finish it first (run its dump "
                    f"again with resume=true)"
                )
            a = Archive(p)
            shards.append(a)
            if a.shard is None:
                raise EngineError(f"{p} is not a shard (it was not dumped with num_shards > 1)")
    except BaseException:
        for a in shards:
            a.close()
        raise
    return sorted(shards, key=lambda a: a.shard.start)


def run_key(a: Archive) -> dict:
    """The run key shared by all shards of one run: the shard's own index dropped."""
    return {k: v for k, v in a.run_key.items() if k != "shard"}


def check(shards: list[Archive]) -> None:
    """Same run, samples 0..total-1 each exactly once, the same model groups everywhere."""
    first = shards[0]
    key, total = run_key(first), first.shard.total
    for a in shards[1:]:
        if run_key(a) != key:
            other = run_key(a)
            diff = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
            raise EngineError(
                f"{a.path} comes from a different run than {first.path} "
                f"(settings differ: {', '.join(diff)})"
            )
    expect = 0
    for a in shards:
        start, stop = a.shard.start, a.shard.stop
        if start < expect:
            raise EngineError(
                f"{_samples(start, min(stop, expect))} in two shards (one of them {a.path})"
            )
        if start > expect:
            raise EngineError(
                f"{_samples(expect, start, total)} missing: give every shard of the run"
            )
        expect = stop
    if expect != total:
        raise EngineError(f"{_samples(expect, total, total)} missing: give every shard of the run")
    for a in shards:
        if set(a.models) != set(first.models):
            raise EngineError(
                f"{a.path} has model groups {sorted(a.models)}, {first.path} has "
                f"{sorted(first.models)}: score every shard alike before merging"
            )
        for k, m in a.models.items():
            m0 = first.models[k]
            if not m.complete:
                raise EngineError(
                    f"model group {k!r} of {a.path} is partial: finish scoring "
                    f"it (resume=true) before merging"
                )
            same = (
                m.codec == m0.codec
                and m.logits.shape[1:] == m0.logits.shape[1:]
                and m.score_key == m0.score_key
                and m.activations == m0.activations
                and m.provenance.get("vocab_hash") == m0.provenance.get("vocab_hash")
            )
            if not same:
                raise EngineError(
                    f"model group {k!r} differs between {first.path} and {a.path} "
                    f"(codec, shape, tokenizer or scoring settings)"
                )


def _samples(lo: int, hi: int, total: int | None = None) -> str:
    of = "" if total is None else f" of {total}"
    return f"sample {lo}{of} is" if hi - lo == 1 else f"samples {lo}..{hi - 1}{of} are"


def record(a: Archive, out_dir: Path, bar: tqdm) -> dict:
    """What `merged_from` keeps of one shard."""
    return {
        **{k: v for k, v in asdict(a.shard).items() if k != "total"},
        "path": os.path.relpath(a.path, out_dir),
        "bytes": a.size_bytes,
        "sha256": sha256_file(a.path, progress=bar.update),
        "host": str(a.f.attrs.get(F.HOST, "")),
        "created": a.created,
        "git_commit": a.git_commit,
        "devices": {
            k: str(m.provenance.get("device_name") or m.provenance.get("device", ""))
            for k, m in a.models.items()
        },
        "self_checks": {k: m.self_check for k, m in a.models.items()},
    }


def write(partial: Path, shards: list[Archive], copy: bool, progress: bool) -> int:
    """Record every shard (sha256 of its bytes) and write the merged layout to `partial`
    (`engine.archive.write_merged`; a copy checks each sample against its shard's checksum)."""
    nbytes = sum(a.size_bytes for a in shards)
    with tqdm(
        total=nbytes * (2 if copy else 1),
        unit="B",
        unit_scale=True,
        desc="merge",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        records = [record(a, partial.parent, bar) for a in shards]
        write_merged(
            partial,
            shards,
            run_key=run_key(shards[0]),
            records=records,
            copy=copy,
            progress=bar.update,
        )
    return partial.stat().st_size


def merge(
    out: str | Path,
    patterns: list[str],
    copy: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Merge the shards matching `patterns` into `out`; returns a summary."""
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise EngineError(f"{out} is a directory; give the merged archive's file path")
    if out.exists() and not overwrite:
        raise EngineError(f"{out} exists; pass --overwrite to replace it")
    paths = expand(patterns)
    if out in paths:
        raise EngineError(f"{out} is one of the shards; write the merged archive elsewhere")
    shards = open_shards(paths)
    try:
        check(shards)
        with staged(out, out.with_name(out.name + ".partial")) as partial:
            size = write(partial, shards, copy, progress)
    finally:
        for a in shards:
            a.close()
    with Archive(out) as a:  # the merged file must open as an archive (and its shards found)
        n = a.n_samples
    return {
        "archive": str(out),
        "shards": len(shards),
        "samples": n,
        "bytes": size,
        "virtual": not copy,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine merge", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the merged archive to write")
    ap.add_argument("shards", nargs="+", help="shard archives, or quoted globs ('run/*/logits.h5')")
    ap.add_argument(
        "--copy",
        action="store_true",
        help="copy the rows into OUT (self-contained) instead of referencing the shards",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with user_errors():
        r = merge(args.out, args.shards, args.copy, args.overwrite, not args.no_progress)
    how = "self-contained copy" if args.copy else "virtual datasets over the shard files"
    print(
        f"merged {r['shards']} shards ({r['samples']} samples, {how}): {r['archive']} "
        f"({r['bytes'] / 2**20:.1f} MiB)",
        file=sys.stdout,
    )
    return 0
