"""float64 numpy references for every kernel: the ground truth of the tests.

Written for clarity, not speed: whole-array numpy in float64, masked entries (-inf) handled
with explicit `where`, gamma found by scipy's bounded scalar minimiser on the KL objective
itself (no moments, no Newton), so it shares no derivation with the fast kernels.
Inputs are already-decoded logits [rows, vocab].
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, minimize_scalar


def logsumexp(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - logsumexp(x)[..., None]


def _plogp(lp):
    p = np.exp(lp)
    return p * np.where(p > 0, lp, 0.0)  # 0 log 0 = 0, without forming 0 * -inf


def entropy(x, base="e", topk=None, renormalize=True):
    lp = log_softmax(x)
    if topk is not None:
        top = -np.sort(-lp, axis=-1)[..., :topk]
        h = -np.sum(_plogp(log_softmax(top)), -1) if renormalize else -np.sum(_plogp(top), -1)
    else:
        h = -np.sum(_plogp(lp), -1)
    return h / np.log(2) if base == 2 else h


def token_stats(x, tokens):
    x = np.asarray(x, np.float64)
    lp = log_softmax(x)
    rows = np.arange(x.shape[0])
    chosen = x[rows, tokens]
    return lp[rows, tokens], 1 + np.sum(x > chosen[:, None], axis=-1)


def pair_stats(p, q, tokens=None):
    lp, lq = log_softmax(p), log_softmax(q)
    P, Q = np.exp(lp), np.exp(lq)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_pq = np.sum(np.where(P > 0, P * (lp - lq), 0.0), -1)
        kl_qp = np.sum(np.where(Q > 0, Q * (lq - lp), 0.0), -1)
        M = 0.5 * (P + Q)
        lm = np.log(np.where(M > 0, M, 1.0))
        js = 0.5 * (
            np.sum(np.where(P > 0, P * (lp - lm), 0.0), -1)
            + np.sum(np.where(Q > 0, Q * (lq - lm), 0.0), -1)
        )
    tv = 0.5 * np.sum(np.abs(P - Q), -1)
    agree = (np.argmax(lp, -1) == np.argmax(lq, -1)).astype(np.float64)
    rows = np.arange(lp.shape[0])
    nan = np.full(len(rows), np.nan)
    dp = (Q[rows, tokens] - P[rows, tokens]) if tokens is not None else nan
    lpt = lp[rows, tokens] if tokens is not None else nan
    lqt = lq[rows, tokens] if tokens is not None else nan
    x = np.asarray(p, np.float64)
    rank = 1 + np.sum(x > x[rows, np.argmax(lq, -1)][:, None], axis=-1)
    return kl_pq, kl_qp, js, tv, agree, dp, lpt, lqt, rank


def kl_to_tempered(p, q, gamma):
    """KL(q || softmax(gamma * log_softmax(p))) for one row and one gamma."""
    lp, lq = log_softmax(p[None])[0], log_softmax(q[None])[0]
    lr = log_softmax((gamma * np.where(np.isfinite(lp), lp, -np.inf))[None])[0]
    Q = np.exp(lq)
    return float(np.sum(np.where(Q > 0, Q * (lq - lr), 0.0)))


def fit_gamma(p, q, bounds=(1e-3, 100.0)):
    """(gamma, KL at gamma, KL at 1) per row by bounded scalar minimisation in float64."""
    out = []
    for pr, qr in zip(np.asarray(p, np.float64), np.asarray(q, np.float64)):
        res = minimize_scalar(
            lambda g: kl_to_tempered(pr, qr, g),
            bounds=bounds,
            method="bounded",
            options={"xatol": 1e-10},
        )
        out.append((res.x, res.fun, kl_to_tempered(pr, qr, 1.0)))
    return tuple(np.array(c) for c in zip(*out))


def tempered_entropy(x, gammas):
    lp = log_softmax(x)
    return np.stack([entropy(np.where(np.isfinite(lp), g * lp, -np.inf)) for g in gammas], -1)


def gamma_for_entropy(x, target, bounds=(1e-4, 1e4)):
    out = []
    for row, t in zip(np.asarray(x, np.float64), np.broadcast_to(target, (len(x),))):
        f = lambda g: tempered_entropy(row[None], [g])[0, 0] - t  # noqa: E731
        out.append(brentq(f, *bounds, xtol=1e-14) if f(bounds[0]) * f(bounds[1]) < 0 else np.nan)
    return np.array(out)


def lens_stats(final, lens, tokens, k):
    """`kernels.lens.lens_stats` from first principles: final [row, vocab], lens [layer, row,
    vocab]; outputs [row, layer] (and [row, layer, k])."""
    lq = log_softmax(final)[None]  # [1, row, vocab]
    lp = log_softmax(lens)  # [layer, row, vocab]
    q = np.exp(lq)
    h = -np.sum(_plogp(lp), -1)
    kl = np.maximum(np.sum(np.where(q > 0, q * (lq - lp), 0.0), -1), 0.0)
    rows = np.arange(lp.shape[1])
    tokens = np.asarray(tokens)
    logp_token = lp[:, rows, tokens]
    top = np.argmax(final, -1)  # the final's most probable token per row
    at = np.asarray(lens, np.float64)[:, rows, top]
    rank = 1 + np.sum(np.asarray(lens, np.float64) > at[..., None], -1)
    order = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    sw = lambda a: np.swapaxes(a, 0, 1)  # noqa: E731
    return sw(h), sw(kl), sw(logp_token), sw(rank), sw(order), sw(np.take_along_axis(lp, order, -1))
