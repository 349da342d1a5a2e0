"""One gamma for many rows, and bootstrap intervals.

Pooled fit: gamma* = argmin_g sum_r w_r KL(q_r || softmax(g log p_r)).  Its derivative is
sum_r w_r (E_g[d_r] - E_q[d_r]) and its second derivative sum_r w_r Var_g[d_r] >= 0, so the
same safeguarded Newton as the per-row fit applies, each iteration one `tempered_moments`
pass over all rows.

Interval: a one-step (linearised) bootstrap over rows (Davison, Hinkley & Schechtman 1986):
at the pooled optimum each row contributes a score g_r = w_r f_r'(gamma*) and a curvature
h_r = w_r f_r''(gamma*); a resample b gives gamma*_b = gamma* - sum_b g / sum_b h.  This costs
no further passes over the logits.  Rows must be independent units for the interval to mean
what it says: resample whole completions (see `groups`), not steps of one completion.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels import columns as C
from kernels._dispatch import NumbaPair, pair
from kernels.api import tempered_moments


class PooledGamma(NamedTuple):
    gamma: float
    kl: float  # weighted mean KL(q || p^gamma) at the optimum
    kl_at_1: float  # weighted mean KL(q || p)
    ci_low: float
    ci_high: float
    n_rows: int  # rows used (rows with infinite KL at every gamma are dropped)


def bootstrap_ci(values, statistic=np.mean, n_boot=2000, alpha=0.05, seed=0):
    """Percentile bootstrap interval of `statistic` over the first axis of `values`."""
    values = np.asarray(values)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([statistic(values[i]) for i in idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


def one_step_bootstrap(estimate, score, curvature, groups, n_boot=2000, alpha=0.05, seed=0):
    """(1 - alpha) percentile interval of an M-estimate by the one-step (linearised) bootstrap
    described above: rows [n] contribute `score` (the estimating function at the estimate)
    and `curvature` (its derivative); whole `groups` [n] are resampled, and a resample b
    moves the estimate by -sum_b(score) / sum_b(curvature).  No pass over the data."""
    grp = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)[1]
    gs, gh = np.bincount(grp, score), np.bincount(grp, curvature)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(gs), size=(n_boot, len(gs)))
    boot = estimate - gs[pick].sum(1) / gh[pick].sum(1)
    return float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))


def fit_gamma_pooled(
    p_logits,
    q_logits,
    weights=None,
    groups=None,
    n_boot=2000,
    alpha=0.05,
    seed=0,
    g_max=100.0,
    tol=1e-7,
    max_iter=60,
) -> PooledGamma:
    """Pooled gamma over rows [..., vocab] held in memory (numpy path), with a (1 - alpha)
    bootstrap interval.  `groups` [...] (e.g. the sample index of each row) makes the
    bootstrap resample whole groups; default: every row is its own group."""
    pq = pair(p_logits, q_logits, numba_only=True)
    base = _gamma_base(pq)
    rows = pq.p.flat()
    return pooled_from_moments(
        base,
        lambda g: tempered_moments(rows, np.array([g]))[:, 0],
        weights,
        groups,
        n_boot,
        alpha,
        seed,
        g_max,
        tol,
        max_iter,
    )


def gamma_base(p_logits, q_logits) -> np.ndarray:
    """Per row [rows, 7]: (E_q[d_p], E_q[log q], log S_p, E_p[d], E_p[d^2], E_p[d^3], max p)
    with d_p = logits of p minus their max (columns named in `kernels.columns`): what a pooled
    fit needs from q, in one pass."""
    return _gamma_base(pair(p_logits, q_logits, numba_only=True))


def _gamma_base(pq: NumbaPair) -> np.ndarray:
    return pq.map("gamma_base", out=(np.float64, (C.N_COLUMNS,))).reshape(pq.n, C.N_COLUMNS)


def pooled_from_moments(
    base: np.ndarray,
    moments_at,
    weights=None,
    groups=None,
    n_boot=2000,
    alpha=0.05,
    seed=0,
    g_max=100.0,
    tol=1e-7,
    max_iter=60,
) -> PooledGamma:
    """The pooled fit from per-row `base` (`gamma_base`, [rows, 7]) and a callable
    `moments_at(g)` -> [rows, 4] tempered moments of the same rows at g (as
    `tempered_moments(rows, [g])[:, 0]`).  Each call is one pass over p: callers holding the
    rows in memory pass a closure; streaming callers pass one that reads an archive.
    `tol` 1e-7 (relative step) sits just above the float32 noise of the moments: a tighter one
    only makes Newton wander inside the noise, at one pass over the data per step."""
    n = base.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(n)
    keep = np.isfinite(base[:, C.Q_DP]) & (w > 0)
    if not keep.any():
        raise ValueError("no row has a finite KL(q || p^gamma): q puts mass where p has none")
    q_dp, q_lq = base[:, C.Q_DP], base[:, C.Q_LOGQ]
    g, lo, hi = 1.0, 0.0, g_max
    m = base[:, C.MOMENTS]  # [rows, 4]: log S, E[d], E[d^2], E[d^3] at the current gamma
    for _ in range(max_iter):
        f1 = np.sum((w * (m[:, C.TM_M1] - q_dp))[keep])
        f2 = np.sum((w * (m[:, C.TM_M2] - m[:, C.TM_M1] ** 2))[keep])
        if f2 <= 0:
            raise ValueError("gamma is not identified: every base row is flat or one-hot")
        lo, hi = (g, hi) if f1 < 0 else (lo, g)
        nxt = g - f1 / f2
        nxt = nxt if lo < nxt < hi else 0.5 * (lo + hi)
        if abs(nxt - g) <= tol * max(1.0, g):
            break
        g = nxt
        m = np.asarray(moments_at(g))
    kl_rows = q_lq - g * q_dp + m[:, C.TM_LOG_S]
    kl1_rows = q_lq - q_dp + base[:, C.LOG_S]
    score = np.where(keep, w * (m[:, C.TM_M1] - q_dp), 0.0)
    curv = np.where(keep, w * (m[:, C.TM_M2] - m[:, C.TM_M1] ** 2), 0.0)
    ci_low, ci_high = one_step_bootstrap(
        g, score, curv, np.arange(n) if groups is None else groups, n_boot, alpha, seed
    )
    wk = w[keep]
    return PooledGamma(
        gamma=float(g),
        kl=float(np.sum(wk * kl_rows[keep]) / wk.sum()),
        kl_at_1=float(np.sum(wk * kl1_rows[keep]) / wk.sum()),
        ci_low=ci_low,
        ci_high=ci_high,
        n_rows=int(keep.sum()),
    )
