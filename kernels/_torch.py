"""torch implementations (CPU or CUDA) with the same semantics as the numba kernels.

Rows are processed in blocks so the float32 working copy stays bounded (`BLOCK_BYTES`);
inside a block everything is whole-tensor torch.  Element-wise work is float32 (float64 for
float64 input); every reduction over the vocabulary is `sum64`: float32 sums of SUM_BLOCK
entries, folded in float64, as the numba kernels do (a float32 sum over 152k entries drifts by
1e-5 relative; `sum(dtype=float64)` would be exact enough but materialises a float64 copy of
the whole [rows, vocab] block, 77.8 MB for 64 x 151936).  Masked entries (-inf) are kept out
of sums with `where`, as in numba.  SUM_BLOCK, EXP_FLOOR and BLOCK_BYTES are the numba
kernels' own (`kernels.constants`); the block loop over rows is `kernels._dispatch`'s.
"""

from __future__ import annotations

import math

import torch

from kernels import columns as C
from kernels.constants import BLOCK_BYTES, EXP_FLOOR, FLAT_VARIANCE, SUM_BLOCK


def decode(data: torch.Tensor, codec: str, scale=None, offset=None) -> torch.Tensor:
    """Stored rows -> compute dtype (float32, or float64 for float64 input)."""
    if codec == "q16":
        codes = data.to(torch.int32) & 0xFFFF  # uint16 held in int16 bit patterns
        return offset[:, None].float() + codes.float() * scale[:, None].float()
    if codec == "bf16" and data.dtype != torch.bfloat16:
        return data.view(torch.bfloat16).float()
    return data if data.dtype == torch.float64 else data.float()


def blocks(n_rows: int, vocab: int):
    step = max(1, BLOCK_BYTES // max(1, 4 * vocab))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(r0 + step, n_rows))


def sum64(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """float64 sum over the last axis [..., vocab] without a float64 copy of `x`."""
    if x.dtype == torch.float64:
        return x.sum(-1, keepdim=keepdim)
    V = x.shape[-1]
    n = V - V % SUM_BLOCK
    total = x[..., :n].unflatten(-1, (n // SUM_BLOCK, SUM_BLOCK)).sum(-1).double().sum(-1)
    if n < V:
        total = total + x[..., n:].sum(-1).double()
    return total.unsqueeze(-1) if keepdim else total


def _plogp(lp):
    return torch.where(lp > -torch.inf, lp.exp() * lp, torch.zeros_like(lp))


def logsumexp(x, keepdim=False):
    """float64 [rows]: exp in the compute dtype, sum in float64.  (torch.logsumexp and
    log_softmax sum in float32 on the CPU: 2e-5 off at a 152k vocabulary.)"""
    m = x.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: log 0 = -inf
    s = sum64(torch.exp(x - m), keepdim=True)
    out = m.double() + torch.log(s)
    return out if keepdim else out[..., 0]


def log_softmax(x):
    return x - logsumexp(x, keepdim=True).to(x.dtype)


def entropy(x):
    """H = log S - E[d], d = x - max: no log-softmax tensor needed."""
    m = x.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = (x - m).clamp_(min=EXP_FLOOR)  # finite, so e * d is 0 where e underflows
    e = torch.exp(d)
    s = sum64(e)
    return torch.log(s) - sum64(e * d) / s


def entropy_topk(x, topk, renormalize):
    """Entropy of the topk most probable tokens (topk <= vocab), renormalised or not."""
    top = torch.topk(x, topk, dim=-1).values
    if renormalize:
        return -sum64(_plogp(log_softmax(top)))
    return -sum64(_plogp(top - logsumexp(x, keepdim=True).to(x.dtype)))


def token_stats(x, tokens):
    lp = log_softmax(x)
    chosen = x.gather(-1, tokens[:, None])
    return lp.gather(-1, tokens[:, None])[:, 0], (x > chosen).sum(-1, dtype=torch.int32).long() + 1


def pair_stats(p, q, tokens):
    lp, lq = log_softmax(p), log_softmax(q)
    P, Q = lp.exp(), lq.exp()
    zero = torch.zeros_like(P)
    kl_pq = sum64(torch.where(P > 0, P * (lp - lq), zero))
    kl_qp = sum64(torch.where(Q > 0, Q * (lq - lp), zero))
    M = 0.5 * (P + Q)
    lm = torch.log(torch.where(M > 0, M, torch.ones_like(M)))
    js = 0.5 * (
        sum64(torch.where(P > 0, P * (lp - lm), zero))
        + sum64(torch.where(Q > 0, Q * (lq - lm), zero))
    )
    tv = 0.5 * sum64((P - Q).abs())
    # a NaN or +inf logit in either row: every divergence is NaN (as the numba kernel, entropy)
    bad = ~(torch.isfinite(p) | (p == -torch.inf)).all(-1)
    bad |= ~(torch.isfinite(q) | (q == -torch.inf)).all(-1)
    kl_pq, kl_qp, js, tv = (torch.where(bad, math.nan, x) for x in (kl_pq, kl_qp, js, tv))
    top_q = lq.argmax(-1, keepdim=True)
    agree = (lp.argmax(-1, keepdim=True) == top_q)[:, 0].to(P.dtype)
    rank = ((p > p.gather(-1, top_q)).sum(-1, dtype=torch.int32) + 1).to(
        P.dtype
    )  # p's rank of q's top token
    if tokens is None:
        dp = lpt = lqt = torch.full_like(tv, math.nan)
    else:
        t = tokens[:, None]  # checked by the caller: in [0, vocab)
        dp = (Q.gather(-1, t) - P.gather(-1, t))[:, 0]
        lpt, lqt = lp.gather(-1, t)[:, 0], lq.gather(-1, t)[:, 0]
    return _by_column(
        {
            C.KL_PQ: kl_pq,
            C.KL_QP: kl_qp,
            C.JS: js,
            C.TV: tv,
            C.ARGMAX_AGREE: agree,
            C.DP: dp,
            C.LOGP_TOKEN: lpt,
            C.LOGQ_TOKEN: lqt,
            C.Q_TOP_RANK_IN_P: rank,
        },
        C.N_PAIR,
    )


def _by_column(columns: dict, n: int) -> torch.Tensor:
    """{column index: [rows]} -> [rows, n]: columns placed by name, not by position."""
    return torch.stack([columns[i] for i in range(n)], -1)


def tempered_moments(x, gammas):
    """[rows, G, 4]: (log S, E[d], E[d^2], E[d^3]) of d = x - max under p^gamma (TM_*)."""
    d = x - x.max(-1, keepdim=True).values  # [rows, vocab]
    out = []
    for i in range(gammas.shape[1]):
        z = gammas[:, i : i + 1].to(d.dtype) * d
        ls = logsumexp(z, keepdim=True).to(z.dtype)
        # weight exactly 0 at or below the floor, as numba's `moments`: otherwise float32
        # subnormals (exp(-100) = 4e-44) keep Var_g[d] > 0 where numba's is 0, and the two
        # backends disagree on whether a row's gamma is identified
        w = torch.where(z > EXP_FLOOR, torch.exp(z - ls), torch.zeros_like(z))
        dd = torch.where(w > 0, d, torch.zeros_like(d))
        wd = w * dd
        out.append(
            _by_column(
                {
                    C.TM_LOG_S: ls[:, 0],
                    C.TM_M1: sum64(wd),
                    C.TM_M2: sum64(wd * dd),
                    C.TM_M3: sum64(wd * dd * dd),
                },
                C.N_MOMENTS,
            )
        )
    return torch.stack(out, 1)


def gamma_base(p, q):
    """Same seven columns as numba's gamma_base (`kernels.columns`)."""
    mp = p.max(-1, keepdim=True).values
    dp = p - mp
    lq = log_softmax(q)
    Q = lq.exp()
    q_dp = sum64(torch.where(Q > 0, Q * dp, torch.zeros_like(Q)))
    q_lq = -entropy(q)
    m = tempered_moments(p, torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device))[:, 0]
    return _by_column(
        {
            C.Q_DP: q_dp,
            C.Q_LOGQ: q_lq,
            C.LOG_S: m[:, C.TM_LOG_S],
            C.M1: m[:, C.TM_M1],
            C.M2: m[:, C.TM_M2],
            C.M3: m[:, C.TM_M3],
            C.P_MAX: mp[:, 0].to(m.dtype),
        },
        C.N_COLUMNS,
    )


def fit_gamma(p, q, g_max=100.0, tol=1e-3, max_iter=50):
    """The numba kernel's safeguarded Halley iteration, vectorised over rows, stopping by the
    same rule (`kernels.api.fit_gamma`, steps 1-7); [rows, 4] in GammaFit's order."""
    base = gamma_base(p, q).double()
    q_dp, q_lq = base[:, C.Q_DP], base[:, C.Q_LOGQ]
    ls, m1, m2, m3 = (base[:, c].clone() for c in (C.LOG_S, C.M1, C.M2, C.M3))
    kl1 = q_lq - q_dp + ls
    g = torch.ones_like(q_dp)
    lo, hi = torch.zeros_like(g), torch.full_like(g, g_max)
    kl = kl1.clone()
    active = torch.isfinite(q_dp)
    flat_rows = torch.zeros_like(active)
    its = torch.zeros_like(g)
    for _ in range(max_iter + 1):
        f1, f2 = m1 - q_dp, m2 - m1 * m1  # 1.
        kl = torch.where(active, q_lq - g * q_dp + ls, kl)
        flat = active & (f2 <= FLAT_VARIANCE)  # 2.
        flat_rows |= flat
        active &= ~flat
        lo = torch.where(active & (f1 < 0), g, lo)  # 3.
        hi = torch.where(active & (f1 >= 0), g, hi)
        f3 = m3 - 3 * m1 * m2 + 2 * m1**3
        den = 2 * f2 * f2 - f1 * f3
        step = torch.where(den > 0, 2 * f1 * f2 / den, f1 / f2)  # 4.
        nxt = g - step
        small = tol * torch.clamp(g, min=1.0)
        inside = (nxt >= lo) & (nxt <= hi)
        conv = active & ((inside & (step.abs() <= small)) | (hi - lo <= small))  # 5.
        took = torch.minimum(torch.maximum(nxt, lo), hi)
        dg = took - g  # converged rows take the last step; KL by third-order Taylor
        kl = torch.where(conv, kl + f1 * dg + 0.5 * f2 * dg**2 + f3 * dg**3 / 6, kl)
        g = torch.where(conv, took, g)
        active &= ~conv & (its < max_iter)  # 6.
        if not bool(active.any()):
            break
        nxt = torch.where((nxt > lo) & (nxt < hi), nxt, 0.5 * (lo + hi))  # 7.
        g = torch.where(active, nxt, g)
        its += active.double()
        idx = active.nonzero()[:, 0]  # one pass over the rows still iterating, not all
        m = tempered_moments(p[idx], g[idx, None].to(p.dtype))[:, 0].double()
        ls[idx], m1[idx], m2[idx], m3[idx] = (
            m[:, c] for c in (C.TM_LOG_S, C.TM_M1, C.TM_M2, C.TM_M3)
        )
    finite = torch.isfinite(q_dp)
    g = torch.where(flat_rows | ~finite, torch.full_like(g, math.nan), g)
    kl = torch.where(flat_rows, kl1, kl)
    kl = torch.where(finite, kl, torch.full_like(g, math.inf))
    return _by_column({C.GAMMA: g, C.KL: kl, C.KL_AT_1: kl1, C.ITERATIONS: its}, C.N_FIT)
