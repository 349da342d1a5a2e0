"""Timing shared by the benchmarks: best wall time of several runs, after an optional warm-up
(first calls pay numba compilation and allocator growth)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeats: int = 3, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def real_archive(name: str, *dump_args: str) -> Path:
    """outputs/bench/<name>: a SmolLM2 dump of real rows, written on first use and kept for
    later runs (about 100 MB); says which, and how to get rid of it."""
    path = ROOT / "outputs" / "bench" / name
    if path.exists():
        print(
            f"real rows: reusing {path} ({path.stat().st_size / 2**20:.0f} MiB; delete it to "
            f"rebuild or free the space)"
        )
        return path
    print(
        f"real rows: dumping SmolLM2 into {path} (kept for later runs; delete it to free the space)"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "dump",
            *dump_args,
            f"out={path}",
            f"hydra.run.dir={path.parent}/logs",
        ],
        cwd=ROOT,
        check=True,
    )
    return path
