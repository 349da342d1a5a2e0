"""Public kernels: row-wise reductions of logits [..., vocab] to a few numbers per row.

Dispatch by input type (`_dispatch`, the one place that knows both backends): numpy arrays
(float16/float32/float64) and `Encoded` numpy data go to the numba kernels (`_numba`), torch
tensors (any device) to `_torch`; both have the same semantics and are checked against
`reference` (float64).  float16 numpy input is read through a uint16 view and decoded
in-kernel (numba has no CPU float16); archive codecs bf16/q16 are passed as `Encoded` and
decoded in-kernel too.  No full-size float32 copy of an input is made on the numba path.
Leading dimensions are kept: `[sample, step, vocab] -> [sample, step]`.  Each function below
is written once for both backends; `_dispatch` owns input normalisation, output allocation
and the torch block loop.

References: entropy and top-5 entropy (Mohammadi 2024, Exp 3); KL/JS/TV/argmax/Δp (llama.cpp
`--kl-divergence`); gamma: pi_aligned ∝ pi_base**gamma, gamma = 1 + alpha/beta (Zhang et al.
2025, Verbalized Sampling).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels import columns as C
from kernels._dispatch import F64, Encoded, NumbaRows, pair, rows
from kernels.codecs import CODECS

__all__ = [
    "CODECS",
    "Encoded",
    "GammaFit",
    "PairStats",
    "TokenStats",
    "branching_factor",
    "entropy",
    "fit_gamma",
    "gamma_for_entropy",
    "log_softmax",
    "logsumexp",
    "pair_stats",
    "tempered_entropy",
    "tempered_moments",
    "token_stats",
]


class TokenStats(NamedTuple):
    logprob: object  # log p(token), nats
    rank: object  # 1 + number of tokens with a strictly larger logit


class PairStats(NamedTuple):
    kl_pq: object  # KL(p || q), nats
    kl_qp: object  # KL(q || p), nats
    js: object  # Jensen-Shannon divergence, nats (<= log 2)
    tv: object  # total variation distance
    argmax_agree: object  # 1.0 where argmax p == argmax q
    dp: object  # q(token) - p(token); NaN without tokens
    logp_token: object  # log p(token), nats; NaN without tokens
    logq_token: object  # log q(token), nats; NaN without tokens
    q_top_rank_in_p: object  # rank under p (1 = argmax) of q's most probable token: with p the
    # base and q the aligned model, the token-shift class of Lin et al. 2023 (URIAL)


class GammaFit(NamedTuple):
    gamma: object  # argmin_g KL(q || softmax(g log p)); NaN where unidentified
    kl: object  # KL at gamma
    kl_at_1: object  # KL(q || p): the gap before tempering
    iterations: object  # Halley/Newton passes over the row after the base pass


# ---- public functions ----------------------------------------------------------------------
def logsumexp(logits):
    """Row-wise log-sum-exp, float64 [...]."""
    return rows(logits).map("logsumexp", out=F64)


def log_softmax(logits):
    """Row-wise log-probabilities, float32 [..., vocab] (a new full-size array: the output)."""
    r = rows(logits)
    return r.map("log_softmax", out=(np.float32, (r.vocab,)))


def _check_topk(topk):
    if topk is not None and not (isinstance(topk, (int, np.integer)) and topk >= 1):
        raise ValueError(f"topk must be a positive integer, got {topk!r}")


def _entropy(r, topk, renormalize):
    if topk is None:
        return r.map("entropy", out=F64)
    return r.map("entropy_topk", min(int(topk), r.vocab), bool(renormalize), out=F64)


def entropy(logits, base="e", topk=None, renormalize=True):
    """Shannon entropy per row [...] in nats (base="e") or bits (base=2).

    topk=k: entropy of the k most probable tokens, renormalised over them (at most log k:
    the paper's top-5 entropy) or, with renormalize=False, the top-k part of the full sum."""
    if base not in ("e", 2):
        raise ValueError(f"base must be 'e' or 2, got {base!r}")
    _check_topk(topk)
    h = _entropy(rows(logits), topk, renormalize)
    return h / np.log(2) if base == 2 else h


def branching_factor(logits, topk=None):
    """exp(H): the effective number of next-token choices at one step (full vocabulary, or
    the top k renormalised).  Per step only: Yang & Holtzman's branching factor (2025) is a
    different, sequence-level quantity (`analyses/lib/branching.py`)."""
    _check_topk(topk)
    r = rows(logits)
    return r.exp(_entropy(r, topk, True))


def token_stats(logits, tokens) -> TokenStats:
    """log-probability (nats) and rank (1 = argmax) of `tokens` [...] in each row."""
    r = rows(logits)
    return TokenStats(*r.map("token_stats", r.tokens(tokens), out=(F64, (np.int64, ()))))


def pair_stats(p_logits, q_logits, tokens=None) -> PairStats:
    """Per row: KL(p||q), KL(q||p), JS, TV, argmax agreement, the rank under p of q's top token
    and, with tokens, Δp = q - p of the token and both log-probabilities of it; p and q are two
    models' logits on identical contexts.  Two passes over each row, whatever is asked."""
    pq = pair(p_logits, q_logits)
    out = pq.map("pair_stats", pq.optional_tokens(tokens), out=(np.float64, (C.N_PAIR,)))
    return PairStats(*(out[..., i] for i in range(C.N_PAIR)))  # columns in the fields' order


def fit_gamma(p_logits, q_logits, g_max=100.0, tol=1e-3, max_iter=50, base=None) -> GammaFit:
    """Per row, the power gamma that best maps base p onto aligned q:
    gamma = argmin KL(q || softmax(gamma * log_softmax(p))), searched in (0, g_max].

    f(g) = KL(q || p^g / S(g)) is convex (f'' is a variance).  Both backends follow this rule
    (`_numba.fit_gamma`, `_torch.fit_gamma`), per row, from g = 1 and the bracket [0, g_max]:
      1. at g: f' = E_g[d] - E_q[d], f'' = Var_g[d], f''' from the tempered moments of d;
      2. f'' <= FLAT_VARIANCE: gamma unidentified (p^g one-hot or uniform): NaN, kl = kl_at_1;
      3. the bracket keeps the root of f' (increasing): lo = g where f' < 0, else hi = g;
      4. the step: Halley, or Newton where Halley's denominator is not positive;
      5. converged if the step lands in the bracket with |step| <= tol * max(1, g), or the
         bracket itself is that narrow (steps are float32 noise then): g takes the step,
         clamped to the bracket, without a further pass, KL by its third-order Taylor
         expansion (Halley's error after it is O(tol**3) ~ 1e-9, below float32 noise);
      6. after `max_iter` passes: stop at g (gamma and KL of the last pass);
      7. otherwise g = the step (the bracket's midpoint where the step leaves it), one pass.
    `iterations` counts the passes over p of step 7 (0 .. max_iter), after the base pass over
    p and q; typically 1-3.  Rows where q has mass and p none: NaN, kl inf, 0 iterations.
    `base` (numpy path): the rows' `kernels.gamma_base(p, q)`, when the caller already has it,
    skips that pass."""
    out = pair(p_logits, q_logits).fit_gamma(
        float(g_max), float(tol), int(max_iter), base, out=(np.float64, (C.N_FIT,))
    )
    return GammaFit(*(out[..., i] for i in range(C.N_FIT)))  # columns in the fields' order


def tempered_moments(logits, gammas):
    """[..., G, 4]: (log S, E[d], E[d^2], E[d^3]) of d = x - max(x) under p^g for each g
    (`columns.TM_*`).  `gammas` is [G] (same for all rows) or [..., G]."""
    r = rows(logits)
    g = r.per_row(gammas)
    return r.map("tempered_moments", g, out=(np.float64, (g.value.shape[-1], C.N_MOMENTS)))


def tempered_entropy(logits, gammas):
    """Entropy (nats) of softmax(g * log p) for each g in `gammas`: [..., G].  g = 1/T is an
    inverse temperature; g > 1 sharpens, as alignment is predicted to."""
    m = tempered_moments(logits, gammas)
    g = rows(logits).like(gammas, m)
    return m[..., C.TM_LOG_S] - g * m[..., C.TM_M1]  # H = log S(g) - g E_g[d]


#: relative resolution of the kernels' entropy (float32 block sums): targets this close to
#: the bracket's ends count as reached
ENTROPY_SLACK = 1e-6


def gamma_for_entropy(logits, target, g_max=1e4, tol=1e-10, max_iter=100):
    """Per row, the g > 0 with H(softmax(g log p)) = target (nats): the effective inverse
    temperature at which the base model matches another model's entropy.  H is decreasing
    in g (dH/dg = -g Var_g[d]); bracketed Newton in log g.  NaN where target is out of reach
    (beyond ENTROPY_SLACK, the float32 sums' resolution of H, of the bracket's ends).
    numpy path only (uses tempered_moments per iteration)."""
    r = NumbaRows(logits)
    n, flat = r.n, r.flat()
    target = np.broadcast_to(np.asarray(target, np.float64), r.lead).reshape(n)
    lo, hi = np.full(n, 1e-6), np.full(n, g_max)
    h_lo = tempered_entropy(flat, lo[:, None])[:, 0]
    h_hi = tempered_entropy(flat, hi[:, None])[:, 0]
    # reachable up to the kernels' float32 resolution of H: a target that another power of
    # this very row gave can land a rounding error outside [H(g_max), H(1e-6)] where H is flat
    slack = ENTROPY_SLACK * (1 + np.abs(target))
    ok = (target <= h_lo + slack) & (target >= h_hi - slack)
    g = np.where(ok, 1.0, np.nan)
    for _ in range(max_iter):
        m = tempered_moments(flat, np.where(ok, g, 1.0)[:, None])[:, 0]
        h = m[:, C.TM_LOG_S] - g * m[:, C.TM_M1]
        dh = -g * (m[:, C.TM_M2] - m[:, C.TM_M1] ** 2)  # dH/dg
        lo = np.where(ok & (h > target), g, lo)
        hi = np.where(ok & (h <= target), g, hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nxt = g * np.exp(-(h - target) / (g * dh))  # Newton in log g; wild steps bisect
        nxt = np.where((nxt > lo) & (nxt < hi), nxt, np.sqrt(lo * hi))
        done = ~ok | (np.abs(nxt - g) <= tol * g)
        g = np.where(ok, nxt, g)
        if done.all():
            break
    return g.reshape(r.lead)
