"""numba CPU kernels over logit rows [rows, vocab], one compiled family per input codec.

Every kernel is a `prange` over rows (never inside a row) with plain loops inside; each row is
read a few times while it sits in L2.  Per element the work is float32 (decode, subtract the
row max, polynomial exp from `_bits`), accumulations are float64 so sums over 150k entries
keep ~1e-12 relative error.  fastmath is limited to {reassoc, contract, nsz}: reassociation
lets LLVM vectorize the reductions; nnan/ninf are *not* set because -inf (masked tokens) is
data here, handled by explicit selects (`e > 0`) that keep 0 * -inf out of every sum.

Caching.  The kernels below are templates: `family(kind)` binds each one to its codec's
decoder by giving the same code object a globals dict of its own (`_bind`), with a qualname
that names the codec and a hash of this package's numba sources.  They have no closure, so
numba's on-disk cache (`cache=True`) keys them by code and signature alone and a fresh process
loads them instead of compiling (closures over dispatchers never hit: a dispatcher pickles with
a random uuid).  The source hash in the name keeps a cache from outliving an edit of `_bits`
or of the constants in `constants` and `columns`, which numba does not track.  Cached parallel
kernels once crashed when the thread count changed (pynndescent #175); tests/test_jit_cache.py
loads them in fresh processes with other thread counts and threading layers.

Notation inside a row: x = decoded value, m = row max, d = x - m <= 0, e = exp(d),
S = sum e, so log p = d - log S.
"""

from __future__ import annotations

import functools
import hashlib
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, prange

from kernels._bits import EXP_FLOOR, bf16_bits_to_f32, exp_nonpos, f16_bits_to_f32, log_pos
from kernels.columns import (
    ARGMAX_AGREE,
    DP,
    GAMMA,
    ITERATIONS,
    JS,
    KL,
    KL_AT_1,
    KL_PQ,
    KL_QP,
    LOG_S,
    LOGP_TOKEN,
    LOGQ_TOKEN,
    M1,
    M2,
    M3,
    P_MAX,
    Q_DP,
    Q_LOGQ,
    Q_TOP_RANK_IN_P,
    TM_LOG_S,
    TM_M1,
    TM_M2,
    TM_M3,
    TV,
)
from kernels.constants import FLAT_VARIANCE, SUM_BLOCK

FM = {"reassoc", "contract", "nsz"}
F32 = np.float32
LANES = 16  # independent running maxima in row_max


@dataclass(frozen=True)
class Template:
    """A kernel's Python source and its jit options; compiled per codec by `_bind`."""

    fn: types.FunctionType
    opts: dict


def template(**opts):
    return lambda fn: Template(fn, opts)


# Names the templates call that differ per codec; `family`/`pair_family` bind them.
dec = order = None  # one codec's decoder and exact order key (DECODERS, ORDER)
dec_p = dec_q = order_p = max_p = max_q = d_p = d_q = argmax_p = argmax_q = None  # p and q

_HERE = Path(__file__).parent
#: the files whose values are compiled into the kernels (module-level constants are frozen at
#: compile time, and numba's cache checks only this file's time stamp)
SOURCES = ("_numba.py", "_bits.py", "constants.py", "columns.py")
SOURCE_HASH = hashlib.sha256(b"".join((_HERE / f).read_bytes() for f in SOURCES)).hexdigest()[:12]


def _bind(templates: dict, env: dict, tag: str) -> dict:
    """Compile-on-first-call dispatchers for `templates`, whose globals are this module's plus
    `env`; each helper bound here is visible to the kernels bound after it.  Kernels that are
    not inlined are cached on disk under a name carrying `tag` and SOURCE_HASH."""
    scope = {**globals(), **env}
    out = {}
    for name, t in templates.items():
        fn = types.FunctionType(t.fn.__code__, scope, name, t.fn.__defaults__)
        fn.__qualname__ = f"{name}_{tag}_{SOURCE_HASH}"
        fn.__doc__ = t.fn.__doc__
        cache = t.opts.get("inline") != "always"
        scope[name] = out[name] = njit(cache=cache, **t.opts)(fn)
    return out


# ---- decoders: element j of a row, given the row's q16 scale/offset (ignored otherwise) ----
@njit(inline="always")
def _dec_f32(row, j, sc, off):
    return row[j]


@njit(inline="always")
def _dec_f64(row, j, sc, off):
    return row[j]  # float64 stays float64 until the max is subtracted


@njit(inline="always")
def _dec_f16(row, j, sc, off):
    return f16_bits_to_f32(row[j])


@njit(inline="always")
def _dec_bf16(row, j, sc, off):
    return bf16_bits_to_f32(row[j])


@njit(inline="always")
def _dec_q16(row, j, sc, off):
    return off + F32(row[j]) * sc  # a log-probability; every kernel is shift-invariant


DECODERS = {"f32": _dec_f32, "f64": _dec_f64, "f16": _dec_f16, "bf16": _dec_bf16, "q16": _dec_q16}


@njit(inline="always")
def _code_q16(row, j, sc, off):
    return F32(row[j])  # q16 codes order entries exactly (scale > 0); the decode can round


# ORDER[kind](row, j, sc, off): a value that orders a row's entries exactly as their logits
# (argmax and ranks compare these, never decoded-and-shifted values, which fastmath may round)
ORDER = {**DECODERS, "q16": _code_q16}


# ---- one codec: row helpers (inlined), then kernels over rows [rows, vocab] ----
@template(inline="always", fastmath=FM)
def row_max(row, sc, off):
    """Max of a row.  A single running max is one latency-bound dependency chain (0.6 G
    elem/s); 16 independent lanes let LLVM keep a vector of maxima (1.9 G elem/s)."""
    V = row.shape[0]
    first = dec(row, 0, sc, off)
    lanes = np.full(LANES, first)
    n = V - V % LANES
    for j in range(0, n, LANES):
        for k in range(LANES):
            v = dec(row, j + k, sc, off)
            lanes[k] = v if v > lanes[k] else lanes[k]
    m = lanes.max()
    for j in range(n, V):
        m = max(m, dec(row, j, sc, off))
    return m


@template(inline="always", fastmath=FM)
def row_argmax(row, sc, off):
    """First index of the row's largest entry, by its exact order key; 16 lanes of
    (max, index) as in row_max, then the smallest index among the lanes' equal maxima."""
    V = row.shape[0]
    lanes = np.full(LANES, order(row, 0, sc, off))
    at = np.zeros(LANES, np.int64)
    n = V - V % LANES
    for j in range(0, n, LANES):
        for k in range(LANES):
            v = order(row, j + k, sc, off)
            if v > lanes[k]:
                lanes[k] = v
                at[k] = j + k
    best = lanes[0]
    a = at[0]
    for k in range(1, LANES):
        if lanes[k] > best or (lanes[k] == best and at[k] < a):
            best = lanes[k]
            a = at[k]
    for j in range(n, V):
        v = order(row, j, sc, off)
        if v > best:
            best = v
            a = j
    return a


@template(inline="always", fastmath=FM)
def row_d(row, j, sc, off, m):
    return F32(dec(row, j, sc, off) - m)


@template(inline="always", fastmath=FM)
def row_sum_exp(row, sc, off, m):
    s = 0.0
    for j in range(row.shape[0]):
        s += exp_nonpos(row_d(row, j, sc, off, m))
    return s


@template(inline="always", fastmath=FM)
def online_sums(row, sc, off):
    """One read of the row: (m, S, sum e*d) with d = x - m, by blocks of SUM_BLOCK entries.
    Each block's max is found while the block sits in L1; when it raises the running
    max the totals are rescaled (S' = S e^sh, T' = (T + sh S) e^sh, sh = m_old - m_new).
    Block sums are float32 (<= SUM_BLOCK/16 adds per vector lane), totals float64."""
    V = row.shape[0]
    m = dec(row, 0, sc, off)  # the decoded type; replaced by the first block's max
    s = 0.0
    t = 0.0
    for b0 in range(0, V, SUM_BLOCK):
        blk = row[b0 : min(b0 + SUM_BLOCK, V)]  # iterate a slice from 0: LLVM vectorizes this
        bm = row_max(blk, sc, off)
        if b0 == 0 or bm > m:
            if s > 0:
                sh = float(m - bm)
                k = np.exp(sh)
                t = (t + sh * s) * k
                s = s * k
            m = bm
        if m == -np.inf:  # nothing finite yet: this block adds no mass
            continue
        bs = F32(0.0)
        bt = F32(0.0)
        for j in range(blk.shape[0]):
            d = max(F32(dec(blk, j, sc, off) - m), EXP_FLOOR)  # finite, so 0 * d = 0
            e = exp_nonpos(d)
            bs += e
            bt += e * d
        s += bs
        t += bt
    return m, s, t


@template(inline="always", fastmath=FM)
def moments(row, sc, off, m, g):
    """(log S, E[d], E[d^2], E[d^3]) under weights e = exp(g d), d = x - m; float32
    block sums over slices (vectorized), float64 totals."""
    V = row.shape[0]
    gg = F32(g)
    s = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    for b0 in range(0, V, SUM_BLOCK):
        blk = row[b0 : min(b0 + SUM_BLOCK, V)]
        b = F32(0.0)
        b1 = F32(0.0)
        b2 = F32(0.0)
        b3 = F32(0.0)
        for j in range(blk.shape[0]):
            d = F32(dec(blk, j, sc, off) - m)  # -inf where the token is masked
            z = gg * d  # the floor applies to g d, not d: for g < 1, d far below it counts
            e = exp_nonpos(max(z, EXP_FLOOR)) if z > EXP_FLOOR else F32(0.0)
            d = d if e > 0 else F32(0.0)  # keeps 0 * -inf out of the sums
            ed = e * d
            b += e
            b1 += ed
            b2 += ed * d
            b3 += ed * d * d
        s += b
        s1 += b1
        s2 += b2
        s3 += b3
    return np.log(s), s1 / s, s2 / s, s3 / s


@template(parallel=True, fastmath=FM)
def logsumexp(data, scale, offset, out):  # out [rows] float64
    for r in prange(data.shape[0]):
        m, s, _ = online_sums(data[r], scale[r], offset[r])
        out[r] = m + np.log(s)


@template(parallel=True, fastmath=FM)
def log_softmax(data, scale, offset, out):  # out [rows, vocab] float32
    for r in prange(data.shape[0]):
        row, sc, off = data[r], scale[r], offset[r]
        m, s, _ = online_sums(row, sc, off)
        ls = F32(np.log(s))
        o = out[r]
        for j in range(row.shape[0]):
            o[j] = row_d(row, j, sc, off, m) - ls


@template(parallel=True, fastmath=FM)
def entropy(data, scale, offset, out):  # out [rows] float64, nats
    for r in prange(data.shape[0]):
        _, s, t = online_sums(data[r], scale[r], offset[r])
        out[r] = np.log(s) - t / s  # H = log S - E[d]


@template(parallel=True, fastmath=FM)
def entropy_topk(data, scale, offset, k, renormalize, out):
    """Entropy of the k most probable tokens: renormalised over them (<= log k), or the
    partial sum -sum_{top k} p log p with full-vocabulary p."""
    for r in prange(data.shape[0]):
        row, sc, off = data[r], scale[r], offset[r]
        m = row_max(row, sc, off)
        top = np.full(k, -np.inf, dtype=np.float32)  # ascending; top[0] is the k-th best
        for j in range(row.shape[0]):
            d = row_d(row, j, sc, off, m)
            if d > top[0]:
                i = 0
                while i + 1 < k and top[i + 1] < d:
                    top[i] = top[i + 1]
                    i += 1
                top[i] = d
        s = 0.0
        s1 = 0.0
        for i in range(k):
            e = exp_nonpos(top[i])
            s += e
            s1 += e * top[i] if e > 0 else 0.0
        if renormalize:
            out[r] = np.log(s) - s1 / s
        else:
            ls = np.log(row_sum_exp(row, sc, off, m))
            out[r] = (ls * s - s1) / np.exp(ls)  # -sum p (d - ls), p = e / S


@template(parallel=True, fastmath=FM)
def token_stats(data, scale, offset, tokens, logprob, rank):
    for r in prange(data.shape[0]):
        row, sc, off = data[r], scale[r], offset[r]
        m = row_max(row, sc, off)
        dt = row_d(row, tokens[r], sc, off, m)
        s = 0.0
        above = 0
        for j in range(row.shape[0]):
            d = row_d(row, j, sc, off, m)
            s += exp_nonpos(d)
            above += 1 if d > dt else 0
        logprob[r] = dt - np.log(s)
        rank[r] = above + 1


@template(parallel=True, fastmath=FM)
def tempered_moments(data, scale, offset, gammas, out):
    """For each row r and each g = gammas[r, i]: out[r, i] = (log sum e, E[d], E[d^2],
    E[d^3]) with e = exp(g d), i.e. under r_g ∝ p^g (columns TM_*)."""
    for r in prange(data.shape[0]):
        row, sc, off = data[r], scale[r], offset[r]
        m = row_max(row, sc, off)
        for i in range(gammas.shape[1]):
            out[r, i, TM_LOG_S], out[r, i, TM_M1], out[r, i, TM_M2], out[r, i, TM_M3] = moments(
                row, sc, off, m, gammas[r, i]
            )


# ---- two aligned row sets p (e.g. base) and q (e.g. aligned), each in its own codec ----
@template(parallel=True, fastmath=FM)
def pair_stats(p, sp, op, q, sq, oq, tokens, out):
    """out[r] = (KL(p||q), KL(q||p), JS, TV, argmax agree, q[tok] - p[tok], log p[tok],
    log q[tok], rank under p of q's argmax), in the columns `kernels.columns` names."""
    for r in prange(p.shape[0]):
        rp, scp, ofp, rq, scq, ofq = p[r], sp[r], op[r], q[r], sq[r], oq[r]
        V = rp.shape[0]
        ap = argmax_p(rp, scp, ofp)
        aq = argmax_q(rq, scq, ofq)
        mp = dec_p(rp, ap, scp, ofp)
        mq = dec_q(rq, aq, scq, ofq)
        ep = np.empty(V, np.float32)
        eq = np.empty(V, np.float32)
        Sp = 0.0
        Sq = 0.0
        for j in range(V):  # pass 1: exps (kept) and sums
            ep[j] = exp_nonpos(d_p(rp, j, scp, ofp, mp))
            eq[j] = exp_nonpos(d_q(rq, j, scq, ofq, mq))
            Sp += ep[j]
            Sq += eq[j]
        lsp = F32(np.log(Sp))
        lsq = F32(np.log(Sq))
        ip = F32(1.0 / Sp)
        iq = F32(1.0 / Sq)
        p_at_top_q = order_p(rp, aq, scp, ofp)  # p's entry at q's most probable token
        kl_pq = 0.0
        kl_qp = 0.0
        js = 0.0
        tv = 0.0
        above = 0
        bad = False  # a NaN or +inf logit in either row: every divergence is NaN (as entropy)
        for j in range(V):  # pass 2: divergences from normalised probabilities
            above += 1 if order_p(rp, j, scp, ofp) > p_at_top_q else 0
            lp = d_p(rp, j, scp, ofp, mp) - lsp
            lq = d_q(rq, j, scq, ofq, mq) - lsq
            bad = bad or lp != lp or lq != lq
            pj = ep[j] * ip
            qj = eq[j] * iq
            mj = F32(0.5) * (pj + qj)
            lm = log_pos(mj) if mj > F32(1e-37) else F32(0.0)  # both ~0: terms vanish
            kl_pq += pj * (lp - lq) if pj > 0 else F32(0.0)  # lq = -inf -> +inf: true KL
            kl_qp += qj * (lq - lp) if qj > 0 else F32(0.0)
            js += (pj * (lp - lm) if pj > 0 else F32(0.0)) + (
                qj * (lq - lm) if qj > 0 else F32(0.0)
            )
            tv += abs(pj - qj)
        if bad:
            kl_pq = kl_qp = js = tv = np.nan
        t = tokens[r]
        out[r, KL_PQ] = kl_pq
        out[r, KL_QP] = kl_qp
        out[r, JS] = 0.5 * js
        out[r, TV] = 0.5 * tv
        out[r, ARGMAX_AGREE] = 1.0 if ap == aq else 0.0
        out[r, DP] = (eq[t] * iq - ep[t] * ip) if t >= 0 else np.nan
        out[r, LOGP_TOKEN] = (d_p(rp, t, scp, ofp, mp) - np.log(Sp)) if t >= 0 else np.nan
        out[r, LOGQ_TOKEN] = (d_q(rq, t, scq, ofq, mq) - np.log(Sq)) if t >= 0 else np.nan
        out[r, Q_TOP_RANK_IN_P] = above + 1


@template(parallel=True, fastmath=FM)
def gamma_base(p, sp, op, q, sq, oq, out):
    """Per row, one read of p and q: out = (E_q[d_p], E_q[log q], then the tempered
    moments of d_p at gamma = 1: log S_p, E_p[d], E_p[d^2], E_p[d^3], and max p), in the
    columns named by `kernels.columns`.

    Online over blocks, as `online_sums`: when a block raises a running max by -sh the
    totals are shifted exactly: with k = e^sh, S' = k S, M1' = k (M1 + sh S),
    M2' = k (M2 + 2 sh M1 + sh^2 S), M3' = k (M3 + 3 sh M2 + 3 sh^2 M1 + sh^3 S) for p;
    for q, sum e_q d_p gains sh_p * S_q, and the q sums scale as in `online_sums`."""
    for r in prange(p.shape[0]):
        rp, scp, ofp, rq, scq, ofq = p[r], sp[r], op[r], q[r], sq[r], oq[r]
        V = rp.shape[0]
        mp = dec_p(rp, 0, scp, ofp)
        mq = dec_q(rq, 0, scq, ofq)
        t = np.zeros(7)  # S_p, M1, M2, M3 (sums of e_p d^k), S_q, sum e_q d_p, e_q d_q
        for b0 in range(0, V, SUM_BLOCK):
            bp = rp[b0 : min(b0 + SUM_BLOCK, V)]
            bq = rq[b0 : min(b0 + SUM_BLOCK, V)]
            bmp = max_p(bp, scp, ofp)
            bmq = max_q(bq, scq, ofq)
            if b0 == 0 or bmp > mp:
                if t[0] > 0 or t[4] > 0:
                    sh = float(mp - bmp)
                    k = np.exp(sh)
                    s0, s1, s2, s3 = t[0], t[1], t[2], t[3]
                    t[0] = k * s0
                    t[1] = k * (s1 + sh * s0)
                    t[2] = k * (s2 + 2 * sh * s1 + sh * sh * s0)
                    t[3] = k * (s3 + 3 * sh * s2 + 3 * sh * sh * s1 + sh**3 * s0)
                    t[5] = t[5] + sh * t[4]
                mp = bmp
            if b0 == 0 or bmq > mq:
                if t[4] > 0:
                    sh = float(mq - bmq)
                    k = np.exp(sh)
                    t[6] = k * (t[6] + sh * t[4])
                    t[5] = k * t[5]
                    t[4] = k * t[4]
                mq = bmq
            a0 = F32(0.0)
            a1 = F32(0.0)
            a2 = F32(0.0)
            a3 = F32(0.0)
            c0 = F32(0.0)
            c1 = F32(0.0)
            c2 = F32(0.0)
            for j in range(bp.shape[0]):
                dp = F32(dec_p(bp, j, scp, ofp) - mp)  # -inf where p is masked
                dq = max(F32(dec_q(bq, j, scq, ofq) - mq), EXP_FLOOR)
                ep = exp_nonpos(dp)
                eq = exp_nonpos(dq)
                df = max(dp, EXP_FLOOR)  # ep = 0 below the floor: finite, so 0 * df = 0
                epd = ep * df
                a0 += ep
                a1 += epd
                a2 += epd * df
                a3 += epd * df * df
                c0 += eq
                c1 += eq * dp if eq > 0 else F32(0.0)  # q > 0 where p = 0: -inf, KL = inf
                c2 += eq * dq
            t[0] += a0
            t[1] += a1
            t[2] += a2
            t[3] += a3
            t[4] += c0
            t[5] += c1
            t[6] += c2
        out[r, Q_DP] = t[5] / t[4]
        out[r, Q_LOGQ] = t[6] / t[4] - np.log(t[4])
        out[r, LOG_S] = np.log(t[0])
        out[r, M1] = t[1] / t[0]
        out[r, M2] = t[2] / t[0]
        out[r, M3] = t[3] / t[0]
        out[r, P_MAX] = mp


@template(parallel=True, fastmath=FM)
def fit_gamma(p, sp, op, basebuf, g_max, tol, max_iter, out):
    """Per-row gamma = argmin KL(q || softmax(gamma log p)): after `gamma_base` (one pass over
    p and q), safeguarded Halley steps, each one pass over p (tempered moments at the new g),
    stopping by the rule of `kernels.api.fit_gamma` (steps 1-7 below), which
    `_torch.fit_gamma` follows too.

    f(g) = E_q[log q] - g E_q[d_p] + log S(g),  S(g) = sum exp(g d_p)
    f'(g) = E_g[d_p] - E_q[d_p],  f''(g) = Var_g[d_p] >= 0 (convex),  f'''(g) = 3rd central
    moment.  The bracket [lo, hi] on the root of f' (increasing) keeps every step safe.

    basebuf from gamma_base; out[r] = (gamma, KL at gamma, KL at 1, passes), GammaFit's order."""
    for r in prange(p.shape[0]):
        rp, scp, ofp = p[r], sp[r], op[r]
        q_dp, q_lq = basebuf[r, Q_DP], basebuf[r, Q_LOGQ]
        ls, m1, m2, m3 = basebuf[r, LOG_S], basebuf[r, M1], basebuf[r, M2], basebuf[r, M3]
        mp = basebuf[r, P_MAX]
        kl1 = q_lq - q_dp + ls
        out[r, KL_AT_1] = kl1
        if not np.isfinite(q_dp):  # q has mass where p has none: KL infinite for all g
            out[r, GAMMA] = np.nan
            out[r, KL] = np.inf
            out[r, ITERATIONS] = 0
            continue
        g = 1.0
        lo = 0.0
        hi = g_max
        it = 0
        while True:
            f1 = m1 - q_dp  # 1. f'(g)
            f2 = m2 - m1 * m1  # f''(g) = Var_g[d] >= 0
            kl = q_lq - g * q_dp + ls
            if f2 <= FLAT_VARIANCE:  # 2. p^g is flat in g (one-hot or uniform p)
                g = np.nan
                kl = kl1
                break
            if f1 < 0:  # 3.
                lo = g
            else:
                hi = g
            f3 = m3 - 3.0 * m1 * m2 + 2.0 * m1**3
            den = 2.0 * f2 * f2 - f1 * f3
            step = 2.0 * f1 * f2 / den if den > 0 else f1 / f2  # 4. Halley, else Newton
            nxt = g - step
            small = tol * max(1.0, g)
            if (lo <= nxt <= hi and abs(step) <= small) or hi - lo <= small:  # 5.
                # Halley's error after this step is O(step**3): take it without another
                # pass, KL by its Taylor expansion to third order.
                nxt = min(max(nxt, lo), hi)
                dg = nxt - g
                kl = kl + f1 * dg + 0.5 * f2 * dg * dg + f3 * dg**3 / 6.0
                g = nxt
                break
            if it >= max_iter:  # 6.
                break
            if not (lo < nxt < hi):  # 7. bisection keeps the bracket
                nxt = 0.5 * (lo + hi)
            g = nxt
            ls, m1, m2, m3 = moments(rp, scp, ofp, mp, g)
            it += 1
        out[r, GAMMA] = g
        out[r, KL] = kl
        out[r, ITERATIONS] = it


HELPERS = ("row_max", "row_argmax", "row_d", "row_sum_exp", "online_sums", "moments")
KERNELS = ("logsumexp", "log_softmax", "entropy", "entropy_topk", "token_stats", "tempered_moments")


@functools.cache
def family(kind: str) -> dict:
    """Helpers and kernels for one input codec, by name (compiled on first call of each)."""
    env = {"dec": DECODERS[kind], "order": ORDER[kind]}
    return _bind({n: globals()[n] for n in HELPERS + KERNELS}, env, kind)


@functools.cache
def pair_family(kind_p: str, kind_q: str) -> dict:
    """pair_stats and gamma_base over p rows in codec kind_p and q rows in kind_q."""
    fp, fq = family(kind_p), family(kind_q)
    env = {
        "dec_p": DECODERS[kind_p],
        "dec_q": DECODERS[kind_q],
        "order_p": ORDER[kind_p],
        "max_p": fp["row_max"],
        "max_q": fq["row_max"],
        "d_p": fp["row_d"],
        "d_q": fq["row_d"],
        "argmax_p": fp["row_argmax"],
        "argmax_q": fq["row_argmax"],
    }
    return _bind({"pair_stats": pair_stats, "gamma_base": gamma_base}, env, f"{kind_p}_{kind_q}")


@functools.cache
def fit_gamma_kernel(kind_p: str):
    """fit_gamma over p rows in codec kind_p."""
    env = {"moments": family(kind_p)["moments"]}
    return _bind({"fit_gamma": fit_gamma}, env, kind_p)["fit_gamma"]
