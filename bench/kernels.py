"""Kernel throughput against the usual baselines, side by side in one process.

Data: real SmolLM2-135M-Instruct logits from an archive (made with `engine dump` if none is
given), and synthetic float16 rows at vocab 49152 and 151936.  Entropy contenders on the same
rows: our numba kernel (float16 decoded in-kernel), our torch kernel, torch
`Categorical(logits).entropy()`, a torch log_softmax pipeline, and a numpy/scipy pipeline.
gamma: our `fit_gamma` vs `scipy.optimize.minimize_scalar` per row on the same objective.
Reported: rows/s, G elements/s, input GB/s, ratios, and fit_gamma's cost in entropy passes.

    .venv/bin/python -m bench.kernels [--archive A.h5] [--rows 1024] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run as a file, this module would shadow the `kernels` package
    os.chdir(Path(__file__).resolve().parent.parent)
    os.execv(sys.executable, [sys.executable, "-m", "bench.kernels", *sys.argv[1:]])

import numba
import numpy as np
import scipy.special
import torch
from scipy.optimize import minimize_scalar

import kernels as K
from bench.common import ROOT, best_of, real_archive
from engine.archive import Archive
from engine.stream import map_rows


def numpy_entropy(x16):
    lp = scipy.special.log_softmax(x16.astype(np.float32), axis=-1)
    return -np.sum(np.exp(lp) * lp, axis=-1)


def torch_pipeline_entropy(t16):
    lp = torch.log_softmax(t16.float(), -1)
    return -(lp.exp() * lp).sum(-1)


def categorical_entropy(t16):
    return torch.distributions.Categorical(logits=t16.float()).entropy()


def scipy_gamma(p, q):
    out = []
    for pr, qr in zip(p.astype(np.float64), q.astype(np.float64)):
        lp = scipy.special.log_softmax(pr)
        lq = scipy.special.log_softmax(qr)
        Q = np.exp(lq)
        f = lambda g: float(np.sum(Q * (lq - scipy.special.log_softmax(g * lp))))  # noqa: E731
        out.append(minimize_scalar(f, bounds=(1e-3, 100), method="bounded").x)
    return np.array(out)


def real_rows(path: Path | None, n: int) -> np.ndarray:
    if path is None:
        path = real_archive("smollm2.h5", "n_samples=8", "max_new_tokens=64")
    with Archive(path) as a:
        rows, got = [], 0
        for b in a.iter_rows():
            rows.append(b.raw.astype(np.float16))
            got += len(b.raw)
            if got >= n:
                break
    return np.concatenate(rows)[:n]


def table(title, results, ref_name):
    print(f"\n{title}")
    print(f"ratio column: throughput relative to {ref_name}")
    print(f"{'method':<38}{'rows/s':>12}{'G elem/s':>10}{'GB/s in':>9}{'ratio':>14}")
    ref_rate = results[ref_name][1] / results[ref_name][0]  # rows/s: row counts differ
    for name, (sec, rows, vocab, itemsize) in results.items():
        print(
            f"{name:<38}{rows / sec:>12.0f}{rows * vocab / sec / 1e9:>10.3f}"
            f"{rows * vocab * itemsize / sec / 1e9:>9.2f}{rows / sec / ref_rate:>14.2f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument(
        "--slow-rows",
        type=int,
        default=None,
        help="rows for the slow baselines (default: all rows, same data as ours)",
    )
    ap.add_argument("--gamma-rows", type=int, default=48, help="rows for per-row scipy gamma")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    datasets = {"smollm2 real (V=49152)": real_rows(args.archive, args.rows)}
    for V in (49152, 151936):
        n = max(64, args.rows * 49152 // V)
        datasets[f"synthetic N(0,3^2) V={V}"] = (rng.standard_normal((n, V)) * 3).astype(np.float16)
    print(
        f"numba {numba.__version__}, torch {torch.__version__}, CPU threads available "
        f"{numba.config.NUMBA_NUM_THREADS}; float16 input; best of 3"
    )
    for name, x in datasets.items():
        R, V = x.shape
        s = min(R, args.slow_rows or R)
        t16, ts16 = torch.from_numpy(x), torch.from_numpy(x[:s])
        res = {}
        threads = [int(v) for v in args.threads.split(",")]
        for th in threads:
            numba.set_num_threads(th)
            torch.set_num_threads(th)
            res[f"numba entropy ({th} thr)"] = (best_of(lambda: K.entropy(x)), R, V, 2)
            res[f"torch kernel entropy ({th} thr)"] = (best_of(lambda: K.entropy(t16)), R, V, 2)
            res[f"numpy/scipy pipeline ({th} thr)"] = (
                best_of(lambda: numpy_entropy(x[:s])),
                s,
                V,
                2,
            )
            res[f"torch log_softmax pipeline ({th} thr)"] = (
                best_of(lambda: torch_pipeline_entropy(t16)),
                R,
                V,
                2,
            )
            res[f"torch Categorical ({th} thr)"] = (
                best_of(lambda: categorical_entropy(ts16)),
                s,
                V,
                2,
            )
        table(f"entropy, {name}: {R} rows", res, f"torch Categorical ({threads[0]} thr)")

    x = datasets["smollm2 real (V=49152)"]
    R, V = x.shape
    q = (1.5 * x.astype(np.float32) + rng.standard_normal(x.shape, np.float32) * 0.3).astype(
        np.float16
    )
    g = args.gamma_rows
    res = {}
    numba.set_num_threads(1)
    t_ent = best_of(lambda: K.entropy(x))
    t_fit = best_of(lambda: K.fit_gamma(x, q))
    fit = K.fit_gamma(x, q)
    res["numba fit_gamma (1 thr)"] = (t_fit, R, V, 4)
    numba.set_num_threads(2)
    res["numba fit_gamma (2 thr)"] = (best_of(lambda: K.fit_gamma(x, q)), R, V, 4)
    res["torch fit_gamma"] = (
        best_of(lambda: K.fit_gamma(torch.from_numpy(x), torch.from_numpy(q))),
        R,
        V,
        4,
    )
    res["scipy minimize_scalar per row"] = (best_of(lambda: scipy_gamma(x[:g], q[:g]), 2), g, V, 4)
    table(
        "gamma fit on real SmolLM2 rows (p) vs noisy p^1.5 (q); input = both arrays",
        res,
        "scipy minimize_scalar per row",
    )
    ref = scipy_gamma(x[:g], q[:g])
    print(
        f"\nfit_gamma cost: {t_fit / t_ent:.2f} entropy passes (1 thread); mean Halley passes "
        f"after the base pass {fit.iterations.mean():.2f}; max |gamma - scipy| over {g} rows "
        f"{np.max(np.abs(fit.gamma[:g] - ref)):.2e}"
    )

    if args.archive or (ROOT / "outputs" / "bench" / "smollm2.h5").exists():
        path = args.archive or ROOT / "outputs" / "bench" / "smollm2.h5"
        numba.set_num_threads(2)
        with Archive(path) as a:
            n = int(a.samples()["length"].sum())
            t = best_of(lambda: map_rows(a, K.entropy, progress=False), 2)
        print(
            f"\nstreamed from HDF5 (map_rows, whole chunks, 2 threads): {n / t:.0f} rows/s, "
            f"{n * V * 2 / t / 1e9:.2f} GB/s of fp16 logits"
        )


if __name__ == "__main__":
    main()
