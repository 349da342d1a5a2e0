"""The numba kernels are cached on disk and load, correct, in fresh processes.

Each process below runs the parallel kernels on fp16 and float32 rows with its own thread count
or threading layer, against one NUMBA_CACHE_DIR: the first compiles and saves, the others must
load every kernel from the cache (no compilation) and give bit-identical results, which also
match the float64 reference.  Cached parallel kernels once segfaulted when the thread count
changed (pynndescent #175); a crash here fails the subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import numpy as np
import kernels
from kernels import _numba, reference as ref

rng = np.random.default_rng(0)
p = (rng.standard_normal((48, 3001)) * 3).astype(np.float16)
q = (p.astype(np.float32) * 1.3 + rng.standard_normal(p.shape).astype(np.float32) * 0.2)
tok = rng.integers(0, p.shape[1], p.shape[0])
h = kernels.entropy(p)
ts = kernels.token_stats(p, tok)
ps = kernels.pair_stats(p, q, tok)
g = kernels.fit_gamma(p, q)
te = kernels.tempered_entropy(p, np.array([0.5, 2.0]))
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
    "digest": [x.tobytes().hex()[:64] for x in (h, ts.logprob, ps.kl_pq, ps.js, g.gamma, te)],
}))
"""


def _run(cache_dir, **env):
    full = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": ROOT, **env}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cached_parallel_kernels_load_in_fresh_processes(tmp_path):
    first = _run(tmp_path, NUMBA_NUM_THREADS="2")
    assert first["misses"] == first["kernels"] and first["hits"] == 0  # compiled and saved
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(tmp_path) for f in fs)
    for env in ({"NUMBA_NUM_THREADS": "1"},
                {"NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "workqueue"}):
        again = _run(tmp_path, **env)
        assert again["misses"] == 0 and again["hits"] == again["kernels"], env  # loaded
        assert again["digest"] == first["digest"], env  # bit-identical results
    assert first["err"] < 1e-5  # and right: against the float64 reference
