"""Timing shared by the benchmarks: best wall time of several runs, after an optional warm-up
(first calls pay numba compilation and allocator growth)."""

from __future__ import annotations

import time


def best_of(fn, repeats: int = 3, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
