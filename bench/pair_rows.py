"""The pair analysis' per-row work, fused against unfused, side by side in one process.

fused     what `analyses.pair.rows_report` does: gamma_base (one pass over p and q, whose
          log S_p - E_p[d] is also p's entropy), pair_stats (divergences, token log-probs and
          the rank under p of q's top token in its two passes) and fit_gamma's Halley passes;
unfused   the same numbers from one kernel call per statistic: the three kernels above plus
          entropy(p), token_stats(p), token_stats(q) and token_stats(p, argmax of q's
          log_softmax) for the token-shift rank.
Both on the same rows (an archive with a scored twin, e.g. the demo's), float16, best of 3.

    .venv/bin/python -m bench.pair_rows [--archive outputs/demo/smollm2-135m-instruct.h5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import kernels as K
from analyses.pair import rows_report
from bench.common import best_of
from engine.archive import Archive

ROOT = Path(__file__).resolve().parent.parent


def unfused(p, q, tokens):
    base = K.gamma_base(p, q)
    s = K.pair_stats(p, q, tokens)
    g = K.fit_gamma(p, q, base=base)
    return {
        **s._asdict(),
        "gamma": g.gamma,
        "base_entropy": K.entropy(p),
        "shift_rank": K.token_stats(p, np.argmax(K.log_softmax(q), -1)).rank,
        "lp_base": K.token_stats(p, tokens).logprob,
        "lp_aligned": K.token_stats(q, tokens).logprob,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--archive", type=Path, default=ROOT / "outputs" / "demo" / "smollm2-135m-instruct.h5"
    )
    args = ap.parse_args()
    if not args.archive.exists():
        raise SystemExit(f"{args.archive} not found: run `make demo` or pass --archive")
    with Archive(args.archive) as a:
        base, aligned = a.generator, next(k for k in a.models if k != a.generator)
        p = np.concatenate([b.raw for b in a.iter_rows(base)])
        q = np.concatenate([b.raw for b in a.iter_rows(aligned)])
        tok = np.concatenate([a.samples()["tokens"][b.sample, b.steps] for b in a.iter_rows()])
    f, u = rows_report(p, q, tok), unfused(p, q, tok)
    same = (
        np.array_equal(f["q_top_rank_in_p"], u["shift_rank"])
        and np.allclose(f["base_entropy"], u["base_entropy"], atol=1e-5)
        and np.allclose(f["logp_token"], u["lp_base"], atol=1e-5)
        and np.allclose(f["logq_token"], u["lp_aligned"], atol=1e-5)
    )
    t_f = best_of(lambda: rows_report(p, q, tok))
    t_u = best_of(lambda: unfused(p, q, tok))
    print(f"{base} vs {aligned}: {p.shape[0]} rows x vocab {p.shape[1]}, {p.dtype}")
    print(f"{'path':<10}{'seconds':>10}{'rows/s':>10}")
    for name, t in (("unfused", t_u), ("fused", t_f)):
        print(f"{name:<10}{t:>10.3f}{p.shape[0] / t:>10.0f}")
    print(f"fused / unfused = {t_f / t_u:.3f}  (same numbers: {same})")


if __name__ == "__main__":
    main()
