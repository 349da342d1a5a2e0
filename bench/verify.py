"""Checksums at 7B scale: does hashing slow the writer, and does `verify` keep up with the disk?

One process, side by side:

1. Writer, hashing on and off (`ModelWriter.hashing`), alternately, --rounds times each, on
   an archive of --writer-batches batches (the generator group only) written into the page
   cache without a sync: the writer's own cost (chunk buffers, hashing, HDF5 writes), where an
   overhead would show most.  Best time of each, and their ratio.
2. The archive of bench/scale.py's size (200 samples x 128 steps x V = 128,256, two model
   groups, fp16: about 13 GB) written through the real writer (`create`, `write_batch`, a
   scored group through `open_scored_group`), hashing off and on alternately
   (--synced-rounds each), each synced to disk: end-to-end write time, and the ratio.  Rows
   come from a pool built once (one batch's steps, reused for every batch), so producing
   them costs nothing here: the writer is all that is timed.
3. The file read sequentially after evicting it from the page cache (POSIX_FADV_DONTNEED):
   the disk's read rate.  Then `verify` (engine/commands/verify.py) on it, evicted first (cold), and
   again at once (warm, as far as the page cache holds it): GB/s of hashed bytes, against
   the read rate; and this process's bytes read from storage, which shows a cold run was cold.

    python -m bench.verify                                   # the scale bench's size (~13 GB, ~3 min)
    python -m bench.verify --prompts 2 --per-prompt 4 --steps 16 --vocab 4096 \\
        --writer-batches 1 --synced-rounds 1                 # quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT
from bench.scale import drop_cache, info, size_args, storage_read_bytes


def pool(args) -> list:
    """One batch's steps as `Rows` ([batch, vocab] fp16, LM-like spread), reused for every batch."""
    from engine.archive import Rows

    rng = np.random.default_rng(0)
    n = args.batch
    return [
        Rows(
            t=t,
            data=rng.normal(0, 3, (n, args.vocab)).astype(np.float16),
            tokens=rng.integers(0, args.vocab - 1, n),
            alive=np.ones(n, bool),
        )
        for t in range(args.steps)
    ]


def write(path: Path, args, rows: list, hashing: bool, scored: bool = True) -> float:
    """Seconds to write the run's generator group, and the scored group unless told not to,
    through the real writer."""
    from engine import archive

    P, M, n = args.prompts, args.per_prompt, args.batch
    total = P * M
    t = time.perf_counter()
    w = archive.create(
        path,
        run_key={"bench": "verify"},
        config_yaml="",
        provenance_root={},
        prompts=[f"prompt {p}" for p in range(P)],
        n_samples=M,
        max_new_tokens=args.steps,
        model=info("base", args, "generator"),
        codec="fp16",
        window=24.0,
        capture_dims={},
    )
    with w:
        w.rows.hashing = hashing
        for s0 in range(0, total, n):
            k = min(n, total - s0)
            w.write_batch(s0, list(range(s0, s0 + k)), _take(rows, k), [args.vocab - 1])
        w.finish()
    if scored:
        mw, _ = archive.open_scored_group(
            path,
            info("aligned", args, "scored"),
            codec="fp16",
            window=24.0,
            resume=False,
            overwrite=False,
        )
        with mw:
            mw.hashing = hashing
            for s0 in range(0, total, n):
                k = min(n, total - s0)
                mw.write(s0, k, _take(rows, k))
                mw.commit(s0 + k)
            mw.finish()
    return time.perf_counter() - t


def _take(rows: list, k: int):
    """The pool's steps for a batch of k <= batch samples."""
    from engine.archive import Rows

    for r in rows:
        yield (
            r
            if k == len(r.alive)
            else Rows(t=r.t, data=r.data[:k], tokens=r.tokens[:k], alive=r.alive[:k])
        )


def writer_overhead(args, rows: list) -> dict:
    """Phase 1: best page-cache write time with and without hashing, alternating, of an
    archive of --writer-batches batches (generator group only)."""
    path = Path(args.dir) / "writer.h5"
    small = argparse.Namespace(
        **{**vars(args), "prompts": 1, "per_prompt": args.writer_batches * args.batch}
    )
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for hashing in (False, True):
            times[hashing].append(write(path, small, rows, hashing, scored=False))
            path.unlink()
    nbytes = small.per_prompt * args.steps * args.vocab * 2
    return {
        "off": min(times[False]),
        "on": min(times[True]),
        "bytes": nbytes,
        "all_off": times[False],
        "all_on": times[True],
    }


def synced_writes(path: Path, args, rows: list) -> dict:
    """Phase 2: the whole archive written and synced, hashing off and on alternately
    (--synced-rounds each); the last one, hashed, is kept for verify."""
    times = {True: [], False: []}
    for _ in range(args.synced_rounds):
        for hashing in (False, True):
            path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            write(path, args, rows, hashing)
            os.sync()
            times[hashing].append(time.perf_counter() - t0)
    return {
        "off": min(times[False]),
        "on": min(times[True]),
        "all_off": times[False],
        "all_on": times[True],
        "bytes": path.stat().st_size,
    }


def sequential_read(path: Path) -> dict:
    """The disk's rate: the file evicted, then read in 16 MiB pieces."""
    drop_cache([path])
    read0, t, n = storage_read_bytes(), time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 24):
            n += len(chunk)
    s = time.perf_counter() - t
    return {"seconds": s, "gb_per_s": n / s / 1e9, "storage": storage_read_bytes() - read0}


def timed_verify(path: Path, cold: bool) -> dict:
    from engine.commands.verify import verify

    if cold:
        drop_cache([path])
    read0 = storage_read_bytes()
    r = verify(path, progress=False, report=lambda line: None)
    if not r.ok:
        sys.exit(f"bench.verify: {path} does not verify: {r.summary()}")
    return {
        "seconds": r.seconds,
        "bytes": r.bytes,
        "gb_per_s": r.bytes / r.seconds / 1e9,
        "file_gb_per_s": path.stat().st_size / r.seconds / 1e9,
        "checks": r.checks,
        "storage": storage_read_bytes() - read0,
    }


def hash_rate() -> float:
    """xxh3_64 alone on 256 MiB in memory, one core."""
    from engine.archive.checksums import digest

    buf = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    digest(buf)
    t = time.perf_counter()
    for _ in range(4):
        digest(buf)
    return 4 * buf.nbytes / (time.perf_counter() - t) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n")[0])
    size_args(ap)
    ap.add_argument(
        "--writer-batches",
        type=int,
        default=4,
        help="batches of the page-cache writer comparison (phase 1)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="page-cache writes with and without hashing each (phase 1)",
    )
    ap.add_argument(
        "--synced-rounds",
        type=int,
        default=2,
        help="whole-archive synced writes with and without hashing each (phase 2)",
    )
    ap.add_argument("--dir", default=str(ROOT / "outputs" / "bench" / "verify"))
    args = ap.parse_args(argv)
    out = Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    need = 2 * args.prompts * args.per_prompt * args.steps * args.vocab * 2
    if need * 1.1 > shutil.disk_usage(out).free:
        sys.exit(f"bench.verify: needs {need / 1e9:.1f} GB free under {out}")
    print(
        f"bench.verify: {args.prompts} prompts x {args.per_prompt} samples x {args.steps} steps "
        f"x V={args.vocab}, 2 groups, fp16 = {need / 1e9:.2f} GB of logits; under {out}",
        flush=True,
    )
    try:
        rows = pool(args)
        print(f"xxh3_64 in memory, one core: {hash_rate():.1f} GB/s", flush=True)
        w = writer_overhead(args, rows)
        print(
            f"writer into the page cache (no sync), {w['bytes'] / 1e9:.2f} GB, best of "
            f"{args.rounds}: hashing off {w['off']:.2f} s, on {w['on']:.2f} s -> on/off = "
            f"{w['on'] / w['off']:.3f}  (all off: "
            + ", ".join(f"{x:.2f}" for x in w["all_off"])
            + "; all on: "
            + ", ".join(f"{x:.2f}" for x in w["all_on"])
            + ")",
            flush=True,
        )
        path = out / "archive.h5"
        s = synced_writes(path, args, rows)
        size, off, on = s["bytes"], s["off"], s["on"]
        print(
            f"writer, whole archive, synced, best of {args.synced_rounds}: {size / 1e9:.2f} GB: "
            f"hashing off {off:.1f} s ({size / off / 1e9:.2f} GB/s), on {on:.1f} s "
            f"({size / on / 1e9:.2f} GB/s) -> on/off = {on / off:.3f}  (all off: "
            + ", ".join(f"{x:.1f}" for x in s["all_off"])
            + "; all on: "
            + ", ".join(f"{x:.1f}" for x in s["all_on"])
            + ")",
            flush=True,
        )
        disk = sequential_read(path)
        print(
            f"sequential read, cold: {disk['gb_per_s']:.2f} GB/s ({size / 1e9:.2f} GB in "
            f"{disk['seconds']:.1f} s; {disk['storage'] / 1e9:.2f} GB from storage)",
            flush=True,
        )
        for cold in (True, False):
            v = timed_verify(path, cold)
            print(
                f"verify, {'cold' if cold else 'warm'}: {v['checks']} checksums, "
                f"{v['bytes'] / 1e9:.2f} GB hashed in {v['seconds']:.1f} s = "
                f"{v['gb_per_s']:.2f} GB/s ({v['file_gb_per_s']:.2f} GB/s of the file; "
                f"{v['storage'] / 1e9:.2f} GB from storage) -> "
                f"{v['gb_per_s'] / disk['gb_per_s']:.2f} x the cold sequential read",
                flush=True,
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        print(f"removed {out}")


if __name__ == "__main__":
    main()
