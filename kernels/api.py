"""Public kernels: row-wise reductions of logits [..., vocab] to a few numbers per row.

Dispatch by input type: numpy arrays (float16/float32/float64) and `Encoded` numpy data go to
the numba kernels (`_numba`), torch tensors (any device) to `_torch`; both have the same
semantics and are checked against `reference` (float64).  float16 numpy input is read through
a uint16 view and decoded in-kernel (numba has no CPU float16); archive codecs bf16/q16 are
passed as `Encoded` and decoded in-kernel too.  No full-size float32 copy of an input is made
on the numba path.  Leading dimensions are kept: `[sample, step, vocab] -> [sample, step]`.

References: entropy and top-5 entropy (Mohammadi 2024, Exp 3); KL/JS/TV/argmax/Δp (llama.cpp
`--kl-divergence`); gamma: pi_aligned ∝ pi_base**gamma, gamma = 1 + alpha/beta (Zhang et al.
2025, Verbalized Sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import sys

import numpy as np

from kernels import _numba

# torch is imported only when a torch tensor is passed (then it is already in sys.modules):
# reading archives and running the numba kernels never pays for importing torch.

CODECS = ("fp16", "fp32", "bf16", "q16")


@dataclass(frozen=True)
class Encoded:
    """Stored logit rows as an archive keeps them: `data` [..., vocab] uint16 (bf16 bits or
    q16 codes; numpy uint16 or torch int16/uint16), with q16's per-row `scale`, `offset` [...]."""
    data: object
    codec: str
    scale: object = None
    offset: object = None

    def __post_init__(self):
        if self.codec not in ("bf16", "q16", "fp16"):
            raise ValueError(f"Encoded codec must be bf16, q16 or fp16, got {self.codec!r}")
        if self.codec == "q16" and (self.scale is None or self.offset is None):
            raise ValueError("q16 rows need their per-row scale and offset")


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


# ---- input normalisation -------------------------------------------------------------------
def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x.data if isinstance(x, Encoded) else x, torch.Tensor)


def _backend():
    """(torch, kernels._torch), imported on first use."""
    import torch

    from kernels import _torch
    return torch, _torch


def _numba_rows(x):
    """(kind, data [rows, vocab], scale [rows], offset [rows], lead shape) without copying."""
    if isinstance(x, Encoded):
        kind = {"bf16": "bf16", "q16": "q16", "fp16": "f16"}[x.codec]
        data = np.asarray(x.data)
        if data.dtype == np.float16:
            data = data.view(np.uint16)
        if data.dtype != np.uint16:
            raise ValueError(f"{x.codec} data must be uint16, got {data.dtype}")
    else:
        data = np.asarray(x)
        kinds = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
                 np.dtype(np.float64): "f64"}
        if data.dtype not in kinds:
            raise ValueError(f"logits must be float16/32/64 (or kernels.Encoded for bf16/q16 "
                             f"uint16 data), got {data.dtype}")
        kind = kinds[data.dtype]
        if kind == "f16":
            data = data.view(np.uint16)
    if data.ndim < 1 or data.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty last (vocab) axis, got shape {data.shape}")
    lead = data.shape[:-1]
    data = data.reshape(-1, data.shape[-1])
    rows = data.shape[0]
    if isinstance(x, Encoded) and x.codec == "q16":
        scale = np.asarray(x.scale, np.float32).reshape(rows)
        offset = np.asarray(x.offset, np.float32).reshape(rows)
    else:
        scale = offset = np.zeros(rows, np.float32)
    return kind, data, scale, offset, lead


def _torch_blocks(x):
    """(lead shape, rows, iterator of (slice, decoded block [b, vocab]))."""
    _, _torch = _backend()
    if isinstance(x, Encoded):
        data, codec = x.data, x.codec
        rows_data = data.reshape(-1, data.shape[-1])
        sc = x.scale.reshape(-1) if x.scale is not None else None
        of = x.offset.reshape(-1) if x.offset is not None else None
    else:
        data, codec = x, "fp32"
        rows_data, sc, of = x.reshape(-1, x.shape[-1]), None, None
    lead = tuple(data.shape[:-1])
    V = rows_data.shape[-1]

    def gen():
        for sl in _torch.blocks(rows_data.shape[0], V):
            yield sl, _torch.decode(rows_data[sl], codec, None if sc is None else sc[sl],
                                    None if of is None else of[sl])
    return lead, rows_data.shape[0], gen()


def _data(x):
    return x.data if isinstance(x, Encoded) else x


def _torch_device(x):
    return _data(x).device


def _torch_map(x, fn):
    """fn(block, slice) -> [b] per block of rows, reshaped to the lead shape."""
    torch, _ = _backend()
    lead, n, it = _torch_blocks(x)
    parts = [fn(block, sl) for sl, block in it]
    return (torch.cat(parts) if parts else torch.empty(0)).reshape(lead)


def _pair_check(p, q):
    sp, sq = _data(p).shape, _data(q).shape
    if tuple(sp) != tuple(sq):
        raise ValueError(f"p and q must have the same shape, got {tuple(sp)} and {tuple(sq)}")


def _tokens(tokens, rows, vocab, device=None):
    """The one token-id rule of both backends: integers, one per row, each in [0, vocab).
    numpy int64 for numba, or (with `device`) a long tensor there; checked before any kernel
    indexes with them (an out-of-range gather is a device-side assert on CUDA)."""
    if _is_torch(tokens):
        torch, _ = _backend()
        t = tokens.reshape(-1)
        ints = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        lo_hi = torch.aminmax(t.long()) if ints and t.numel() else None
        lo, hi = (int(v) for v in torch.stack(lo_hi).tolist()) if lo_hi else (0, 0)
    else:
        t = np.asarray(tokens).reshape(-1)
        ints = np.issubdtype(t.dtype, np.integer)
        lo, hi = (int(t.min()), int(t.max())) if ints and t.size else (0, 0)
    if not ints:
        raise ValueError(f"token ids must be integers, got {t.dtype}")
    if t.shape[0] != rows:
        raise ValueError(f"need one token per row: {rows} rows, {t.shape[0]} tokens")
    if t.shape[0] and (lo < 0 or hi >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got [{lo}, {hi}]")
    if device is None:
        return np.asarray(t.cpu() if _is_torch(t) else t).astype(np.int64)
    torch, _ = _backend()
    return torch.as_tensor(t).long().to(device)


# ---- public functions ----------------------------------------------------------------------
def logsumexp(logits):
    """Row-wise log-sum-exp, float64 [...]."""
    if _is_torch(logits):
        _, _torch = _backend()
        return _torch_map(logits, lambda b, sl: _torch.logsumexp(b))
    kind, data, sc, of, lead = _numba_rows(logits)
    out = np.empty(data.shape[0], np.float64)
    _numba.family(kind)["logsumexp"](data, sc, of, out)
    return out.reshape(lead)


def log_softmax(logits):
    """Row-wise log-probabilities, float32 [..., vocab] (a new full-size array: the output)."""
    if _is_torch(logits):
        torch, _torch = _backend()
        lead, n, it = _torch_blocks(logits)
        parts = [_torch.log_softmax(b) for _, b in it]
        return torch.cat(parts).reshape(*lead, -1)
    kind, data, sc, of, lead = _numba_rows(logits)
    out = np.empty(data.shape, np.float32)
    _numba.family(kind)["log_softmax"](data, sc, of, out)
    return out.reshape(*lead, data.shape[-1])


def entropy(logits, base="e", topk=None, renormalize=True):
    """Shannon entropy per row [...] in nats (base="e") or bits (base=2).

    topk=k: entropy of the k most probable tokens, renormalised over them (at most log k:
    the paper's top-5 entropy) or, with renormalize=False, the top-k part of the full sum."""
    if base not in ("e", 2):
        raise ValueError(f"base must be 'e' or 2, got {base!r}")
    if topk is not None and not (isinstance(topk, (int, np.integer)) and topk >= 1):
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if _is_torch(logits):
        _, _torch = _backend()
        h = _torch_map(logits, lambda b, sl: _torch.entropy(b, min(topk, b.shape[-1]) if topk else None, renormalize))
    else:
        kind, data, sc, of, lead = _numba_rows(logits)
        out = np.empty(data.shape[0], np.float64)
        fam = _numba.family(kind)
        if topk is None:
            fam["entropy"](data, sc, of, out)
        else:
            fam["entropy_topk"](data, sc, of, min(int(topk), data.shape[-1]), bool(renormalize), out)
        h = out.reshape(lead)
    return h / np.log(2) if base == 2 else h


def branching_factor(logits, topk=None):
    """exp(H): the effective number of next-token choices (Yang & Holtzman 2025)."""
    h = entropy(logits, topk=topk)
    return h.exp() if _is_torch(h) else np.exp(h)


def token_stats(logits, tokens) -> TokenStats:
    """log-probability (nats) and rank (1 = argmax) of `tokens` [...] in each row."""
    if _is_torch(logits):
        torch, _torch = _backend()
        lead, n, it = _torch_blocks(logits)
        t = _tokens(tokens, n, _data(logits).shape[-1], _torch_device(logits))
        lps, ranks = zip(*[_torch.token_stats(b, t[sl].to(b.device)) for sl, b in it]) if n else ([], [])
        return TokenStats(torch.cat(lps).reshape(lead), torch.cat(ranks).reshape(lead))
    kind, data, sc, of, lead = _numba_rows(logits)
    t = _tokens(tokens, data.shape[0], data.shape[-1])
    lp = np.empty(data.shape[0], np.float64)
    rank = np.empty(data.shape[0], np.int64)
    _numba.family(kind)["token_stats"](data, sc, of, t, lp, rank)
    return TokenStats(lp.reshape(lead), rank.reshape(lead))


def pair_stats(p_logits, q_logits, tokens=None) -> PairStats:
    """Per row: KL(p||q), KL(q||p), JS, TV, argmax agreement, the rank under p of q's top token
    and, with tokens, Δp = q - p of the token and both log-probabilities of it; p and q are two
    models' logits on identical contexts.  Two passes over each row, whatever is asked."""
    _pair_check(p_logits, q_logits)
    if _is_torch(p_logits):
        torch, _torch = _backend()
        lp_, n, itp = _torch_blocks(p_logits)
        _, _, itq = _torch_blocks(q_logits)
        V = _data(p_logits).shape[-1]
        t = None if tokens is None else _tokens(tokens, n, V, _torch_device(p_logits))
        parts = [_torch.pair_stats(bp, bq, None if t is None else t[sl].to(bp.device))
                 for (sl, bp), (_, bq) in zip(itp, itq)]
        out = torch.cat(parts).reshape(*lp_, len(PairStats._fields))
        return PairStats(*out.unbind(-1))
    kp, dp_, spp, opp, lead = _numba_rows(p_logits)
    kq, dq_, sqq, oqq, _ = _numba_rows(q_logits)
    t = (np.full(dp_.shape[0], -1, np.int64) if tokens is None
         else _tokens(tokens, dp_.shape[0], dp_.shape[-1]))
    out = np.empty((dp_.shape[0], len(PairStats._fields)), np.float64)
    _numba.pair_family(kp, kq)["pair_stats"](dp_, spp, opp, dq_, sqq, oqq, t, out)
    out = out.reshape(*lead, len(PairStats._fields))
    return PairStats(*np.moveaxis(out, -1, 0))


def _gamma_base_np(p_logits, q_logits):
    kp, p, sp, op, lead = _numba_rows(p_logits)
    kq, q, sq, oq, _ = _numba_rows(q_logits)
    base = np.empty((p.shape[0], 7), np.float64)
    _numba.pair_family(kp, kq)["gamma_base"](p, sp, op, q, sq, oq, base)
    return (kp, p, sp, op, lead), base


def fit_gamma(p_logits, q_logits, g_max=100.0, tol=1e-3, max_iter=50, base=None) -> GammaFit:
    """Per row, the power gamma that best maps base p onto aligned q:
    gamma = argmin KL(q || softmax(gamma * log_softmax(p))), searched in (0, g_max].

    The objective is convex in gamma (its second derivative is a variance); safeguarded Halley
    steps on the tempered moments of log p.  A step smaller than `tol` (relative) is taken
    without a further pass: Halley's error after it is O(tol**3) ~ 1e-9, below float32 noise.
    Typically 1-3 passes over p after the base pass over p and q.  `base` (numpy path): the
    rows' `kernels.gamma_base(p, q)`, when the caller already has it, skips that pass."""
    _pair_check(p_logits, q_logits)
    if _is_torch(p_logits):
        torch, _torch = _backend()
        lead, n, itp = _torch_blocks(p_logits)
        _, _, itq = _torch_blocks(q_logits)
        out = torch.cat([_torch.fit_gamma(bp, bq, g_max, tol, max_iter)
                         for (_, bp), (_, bq) in zip(itp, itq)]).reshape(*lead, 4)
        return GammaFit(*out.unbind(-1))
    if base is None:
        (kp, p, sp, op, lead), base = _gamma_base_np(p_logits, q_logits)
    else:
        kp, p, sp, op, lead = _numba_rows(p_logits)
        base = np.ascontiguousarray(base, np.float64).reshape(p.shape[0], 7)
    out = np.empty((p.shape[0], 4), np.float64)
    _numba.fit_gamma_kernel(kp)(p, sp, op, base, float(g_max), float(tol), int(max_iter), out)
    out = out.reshape(*lead, 4)
    return GammaFit(*np.moveaxis(out, -1, 0))


def tempered_moments(logits, gammas):
    """[..., G, 4]: (log S, E[d], E[d^2], E[d^3]) of d = x - max(x) under p^g for each g.
    `gammas` is [G] (same for all rows) or [..., G]."""
    if _is_torch(logits):
        torch, _torch = _backend()
        lead, n, it = _torch_blocks(logits)
        g = torch.as_tensor(gammas)
        g = g.reshape(1, -1).expand(n, -1) if g.ndim == 1 else g.reshape(n, -1)
        return torch.cat([_torch.tempered_moments(b, g[sl].to(b.device)) for sl, b in it]) \
            .reshape(*lead, g.shape[-1], 4)
    kind, data, sc, of, lead = _numba_rows(logits)
    g = np.asarray(gammas, np.float64)
    g = np.broadcast_to(g, (data.shape[0], g.shape[-1])) if g.ndim == 1 else g.reshape(data.shape[0], -1)
    out = np.empty((data.shape[0], g.shape[1], 4), np.float64)
    _numba.family(kind)["tempered_moments"](data, sc, of, np.ascontiguousarray(g), out)
    return out.reshape(*lead, g.shape[1], 4)


def tempered_entropy(logits, gammas):
    """Entropy (nats) of softmax(g * log p) for each g in `gammas`: [..., G].  g = 1/T is an
    inverse temperature; g > 1 sharpens, as alignment is predicted to."""
    m = tempered_moments(logits, gammas)
    if _is_torch(m):
        torch, _ = _backend()
        g = torch.as_tensor(gammas, dtype=m.dtype, device=m.device)
    else:
        g = np.asarray(gammas, np.float64)
    return m[..., 0] - g * m[..., 1]  # H = log S(g) - g E_g[d]


def gamma_for_entropy(logits, target, g_max=1e4, tol=1e-10, max_iter=100):
    """Per row, the g > 0 with H(softmax(g log p)) = target (nats): the effective inverse
    temperature at which the base model matches another model's entropy.  H is decreasing
    in g (dH/dg = -g Var_g[d]); bracketed Newton in log g.  NaN where target is out of reach.
    numpy path only (uses tempered_moments per iteration)."""
    kind, data, sc, of, lead = _numba_rows(logits)
    n = data.shape[0]
    target = np.broadcast_to(np.asarray(target, np.float64), lead).reshape(n)
    lo, hi = np.full(n, 1e-6), np.full(n, g_max)
    h_lo = tempered_entropy(data_view(kind, data, sc, of), lo[:, None])[:, 0]
    h_hi = tempered_entropy(data_view(kind, data, sc, of), hi[:, None])[:, 0]
    ok = (target <= h_lo) & (target >= h_hi)
    g = np.where(ok, 1.0, np.nan)
    for _ in range(max_iter):
        m = tempered_moments(data_view(kind, data, sc, of), np.where(ok, g, 1.0)[:, None])[:, 0]
        h = m[:, 0] - g * m[:, 1]
        dh = -g * (m[:, 2] - m[:, 1] ** 2)  # dH/dg
        lo = np.where(ok & (h > target), g, lo)
        hi = np.where(ok & (h <= target), g, hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nxt = g * np.exp(-(h - target) / (g * dh))  # Newton in log g; wild steps bisect
        nxt = np.where((nxt > lo) & (nxt < hi), nxt, np.sqrt(lo * hi))
        done = ~ok | (np.abs(nxt - g) <= tol * g)
        g = np.where(ok, nxt, g)
        if done.all():
            break
    return g.reshape(lead)


def data_view(kind, data, sc, of):
    """Rebuild a kernel input from `_numba_rows` parts (no copy)."""
    if kind == "f16":
        return data.view(np.float16)
    if kind in ("bf16", "q16"):
        return Encoded(data, kind, sc, of)
    return data
