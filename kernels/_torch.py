"""torch implementations (CPU or CUDA) with the same semantics as the numba kernels.

Rows are processed in blocks so the float32 working copy stays bounded (`BLOCK_BYTES`);
inside a block everything is whole-tensor torch.  Element-wise work is float32 (float64 for
float64 input); every reduction over the vocabulary is `sum64`: float32 sums of SUM_BLOCK
entries, folded in float64, as the numba kernels do (a float32 sum over 152k entries drifts by
1e-5 relative; `sum(dtype=float64)` would be exact enough but materialises a float64 copy of
the whole [rows, vocab] block, 77.8 MB for 64 x 151936).  Masked entries (-inf) are kept out
of sums with `where`, as in numba.
"""

from __future__ import annotations

import math

import torch

from kernels import columns as C

BLOCK_BYTES = 64 << 20
SUM_BLOCK = 2048  # entries summed in float32 before folding into a float64 total
EXP_FLOOR = -87.0  # exp below this is < 2**-125: zero for every sum here


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


def entropy(x, topk=None, renormalize=True):
    if topk is None:  # H = log S - E[d], d = x - max: no log-softmax tensor needed
        m = x.max(-1, keepdim=True).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        d = (x - m).clamp_(min=EXP_FLOOR)  # finite, so e * d is 0 where e underflows
        e = torch.exp(d)
        s = sum64(e)
        return torch.log(s) - sum64(e * d) / s
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
    js = 0.5 * (sum64(torch.where(P > 0, P * (lp - lm), zero))
                + sum64(torch.where(Q > 0, Q * (lq - lm), zero)))
    tv = 0.5 * sum64((P - Q).abs())
    top_q = lq.argmax(-1, keepdim=True)
    agree = (lp.argmax(-1, keepdim=True) == top_q)[:, 0].to(P.dtype)
    rank = ((p > p.gather(-1, top_q)).sum(-1, dtype=torch.int32) + 1).to(P.dtype)  # p's rank of q's top token
    if tokens is None:
        dp = lpt = lqt = torch.full_like(tv, math.nan)
    else:
        t = tokens[:, None]  # checked by the caller: in [0, vocab)
        dp = (Q.gather(-1, t) - P.gather(-1, t))[:, 0]
        lpt, lqt = lp.gather(-1, t)[:, 0], lq.gather(-1, t)[:, 0]
    return torch.stack([kl_pq, kl_qp, js, tv, agree, dp, lpt, lqt, rank], -1)


def tempered_moments(x, gammas):
    """[rows, G, 4]: (log S, E[d], E[d^2], E[d^3]) of d = x - max under p^gamma."""
    d = x - x.max(-1, keepdim=True).values  # [rows, vocab]
    out = []
    for i in range(gammas.shape[1]):
        z = gammas[:, i : i + 1].to(d.dtype) * d
        ls = logsumexp(z, keepdim=True).to(z.dtype)
        w = torch.exp(z - ls)
        dd = torch.where(w > 0, d, torch.zeros_like(d))
        wd = w * dd
        out.append(torch.stack([ls[:, 0], sum64(wd), sum64(wd * dd), sum64(wd * dd * dd)], -1))
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
    return torch.cat([q_dp[:, None], q_lq[:, None], m, mp], -1)


def fit_gamma(p, q, g_max=100.0, tol=1e-3, max_iter=50):
    """Vectorised form of the numba kernel's safeguarded Halley iteration; [rows, 4]."""
    base = gamma_base(p, q).double()
    q_dp, q_lq = base[:, C.Q_DP], base[:, C.Q_LOGQ]
    ls, m1, m2, m3 = base[:, C.LOG_S], base[:, C.M1], base[:, C.M2], base[:, C.M3]
    kl1 = q_lq - q_dp + ls
    g = torch.ones_like(q_dp)
    lo, hi = torch.zeros_like(g), torch.full_like(g, g_max)
    kl = kl1.clone()
    active = torch.isfinite(q_dp)
    bad = ~active
    its = torch.zeros_like(g)
    for _ in range(max_iter + 1):
        f1, f2 = m1 - q_dp, m2 - m1 * m1
        kl = torch.where(active, q_lq - g * q_dp + ls, kl)
        flat = active & (f2 <= 1e-300)
        bad |= flat
        active &= ~flat
        lo = torch.where(active & (f1 < 0), g, lo)
        hi = torch.where(active & (f1 >= 0), g, hi)
        f3 = m3 - 3 * m1 * m2 + 2 * m1**3
        den = 2 * f2 * f2 - f1 * f3
        step = torch.where(den > 0, 2 * f1 * f2 / den, f1 / f2)
        nxt = g - step
        inside = (nxt >= lo) & (nxt <= hi)
        narrow = hi - lo <= tol * torch.clamp(g, min=1.0)  # steps are rounding noise
        conv = active & ((inside & (step.abs() <= tol * torch.clamp(g, min=1.0))) | narrow)
        nxt = torch.minimum(torch.maximum(nxt, lo), hi)
        dg = nxt - g  # converged rows take the last step; KL by third-order Taylor
        kl = torch.where(conv, kl + f1 * dg + 0.5 * f2 * dg**2 + f3 * dg**3 / 6, kl)
        g = torch.where(conv, nxt, g)
        active &= ~conv & (its < max_iter)
        if not bool(active.any()):
            break
        nxt = torch.where((nxt > lo) & (nxt < hi), nxt, 0.5 * (lo + hi))
        g = torch.where(active, nxt, g)
        its += active.double()
        idx = active.nonzero()[:, 0]  # one pass over the rows still iterating, not all
        m = tempered_moments(p[idx], g[idx, None].to(p.dtype))[:, 0].double()
        ls[idx], m1[idx], m2[idx], m3[idx] = m.unbind(-1)
    nan, inf = torch.full_like(g, math.nan), torch.full_like(g, math.inf)
    g = torch.where(bad, nan, g)
    kl = torch.where(torch.isfinite(q_dp), kl, inf)
    return torch.stack([g, kl, kl1, its], -1)
