"""The numba kernels are cached on disk and load, correct, in fresh processes.

What the kernels promise (kernels/_numba.py): every kernel is a `prange` over rows and each
row's reduction runs sequentially in block order, so **no result depends on the thread count
or the threading layer**; and the cached machine code is the same in every process that loads
it.  Each process below runs the parallel kernels on fp16 and float32 rows against one
NUMBA_CACHE_DIR: the first compiles and saves and computes at 2 threads and again at 1
(`numba.set_num_threads`), the others load every kernel from the cache (no compilation) with
1 thread, or 2 with the workqueue layer, and must give bit-identical results to each other and
to the compiling process's own 1- and 2-thread runs.

Not promised: bit equality between the freshly compiled module and the one loaded from the
cache.  On an Intel Xeon (AVX-512) they differ in the last bits of some rows (measured: 13 of
48 entropies, |diff| <= 1.5e-7 nats of ~8; with or without FMA contraction), whatever the
thread count; on an AMD EPYC they happened to agree.  Both are checked against the float64
reference, and against each other to float32 block-sum rounding.  Cached parallel kernels once
segfaulted when the thread count changed (pynndescent #175); a crash here fails the subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import numba
import numpy as np
import kernels
from kernels import _numba, reference as ref

rng = np.random.default_rng(0)
p = (rng.standard_normal((48, 3001)) * 3).astype(np.float16)
q = (p.astype(np.float32) * 1.3 + rng.standard_normal(p.shape).astype(np.float32) * 0.2)
tok = rng.integers(0, p.shape[1], p.shape[0])

def results():
    return (kernels.entropy(p), kernels.token_stats(p, tok), kernels.pair_stats(p, q, tok),
            kernels.fit_gamma(p, q), kernels.tempered_entropy(p, np.array([0.5, 2.0])))

def digest(h, ts, ps, g, te):
    return [x.tobytes().hex() for x in (h, ts.logprob, ps.kl_pq, ps.js, g.gamma, te)]

h, ts, ps, g, te = results()
per_threads = {}
for n in range(1, numba.get_num_threads() + 1):
    numba.set_num_threads(n)
    per_threads[n] = digest(*results())
p64, q64 = p.astype(np.float64), q.astype(np.float64)
err = max(float(np.abs(h - ref.entropy(p64)).max()),
          float(np.abs(ts.logprob - ref.token_stats(p64, tok)[0]).max()),
          float(np.abs(ps.kl_pq - ref.pair_stats(p64, q64, tok)[0]).max()),
          float(np.abs(te - ref.tempered_entropy(p64, np.array([0.5, 2.0]))).max()))
used = [_numba.family("f16")[k] for k in ("entropy", "token_stats", "tempered_moments")]
used += list(_numba.pair_family("f16", "f32").values()) + [_numba.fit_gamma_kernel("f16")]
print(json.dumps({
    "hits": sum(sum(d.stats.cache_hits.values()) for d in used),
    "misses": sum(sum(d.stats.cache_misses.values()) for d in used),
    "kernels": len(used),
    "err": err,
    "digest": digest(h, ts, ps, g, te),
    "per_threads": per_threads,
    "values": [x.tolist() for x in (h, ts.logprob, ps.kl_pq, ps.js, g.gamma, te)],
}))
"""


def _run(cache_dir, **env):
    full = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": ROOT, **env}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cached_parallel_kernels_load_in_fresh_processes(tmp_path):
    first = _run(tmp_path, NUMBA_NUM_THREADS="2")
    assert first["misses"] == first["kernels"] and first["hits"] == 0  # compiled and saved
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path) for f in fs)
    # the thread count changes nothing, in the compiling process
    assert set(first["per_threads"]) == {"1", "2"}
    assert first["per_threads"]["1"] == first["per_threads"]["2"] == first["digest"]
    loaded = []
    for env in (
        {"NUMBA_NUM_THREADS": "1"},
        {"NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "workqueue"},
    ):
        again = _run(tmp_path, **env)
        assert again["misses"] == 0 and again["hits"] == again["kernels"], env  # loaded
        loaded.append(again)
    # the cached code gives bit-identical results whatever the threads or threading layer
    assert loaded[0]["digest"] == loaded[1]["digest"]
    # fresh compile and cache agree to float32 block-sum rounding, and both are right
    for a, b in zip(first["values"], loaded[0]["values"]):
        a, b = np.asarray(a), np.asarray(b)
        assert np.allclose(a, b, rtol=1e-6, atol=1e-7), np.abs(a - b).max()
    assert first["err"] < 1e-5 and loaded[0]["err"] < 1e-5  # against the float64 reference
