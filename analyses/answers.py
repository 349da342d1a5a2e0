"""Exact answer distributions over an enumerable candidate set (Verbalized Sampling's "Name a
US state"), from an archive written by `python -m engine answers` (sample i = candidate i, as
a whole answer: its tokens and terminator; a second model added with `score`).

Per model: log P(candidate) = sum over its steps of the stored rows' token log-probabilities
(exact, no sampling); the mass outside the set 1 - sum P; the distribution normalised over the
set, its entropy, coverage (fewest candidates holding 50% and 90% of it), KL to uniform and to
the reference when the file gives one.  Between the generator (base) and each other model:
KL both ways and the exact sequence-level gamma over the candidates (`kernels.fit_gamma` on
the two log P vectors: argmin_g KL(q || softmax(g log p)) over the set), next to the pooled
per-step gamma of the same candidates' rows (token-level tempering; equal only when every
candidate is a single step).  With `analysis.samples=ARCHIVE` (a dump of the same prompt by
the generator) the sampled answer frequencies are compared with the exact ones at growing N,
next to the KL that multinomial noise alone gives at that N (simulated from the exact P).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib.common import save_figure, write_csv
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.errors import EngineError
from engine.stream import map_rows


def candidate_logp(a: Archive, key: str) -> np.ndarray:
    """[candidates] log P(whole answer) under model `key`, from its stored rows."""
    r, sample, _ = map_rows(
        a, lambda rows, tok: K.token_stats(rows, tok).logprob, key, with_tokens=True, progress=False
    )
    return np.bincount(sample, weights=r.get("value", np.empty(0)), minlength=a.n_complete)


def entropy(q: np.ndarray) -> float:
    nz = q[q > 0]
    return float(-np.sum(nz * np.log(nz)))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two distributions on the same support (inf where q = 0 < p)."""
    nz = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def coverage(q: np.ndarray, share: float) -> int:
    return int(np.searchsorted(np.cumsum(np.sort(q)[::-1]), share - 1e-12) + 1)


def model_report(cands, lp: np.ndarray, reference) -> dict:
    P = np.exp(lp)
    q = P / P.sum()
    order = np.argsort(-q)
    out = {
        "mass_in_set": float(P.sum()),
        "mass_outside_set": float(1 - P.sum()),
        "entropy_nats": entropy(q),
        "max_entropy_nats": float(np.log(len(q))),
        "coverage_50": coverage(q, 0.5),
        "coverage_90": coverage(q, 0.9),
        "kl_to_uniform": float(np.log(len(q)) - entropy(q)),
        "top": [
            {"answer": cands[i], "p_normalised": float(q[i]), "p": float(P[i])} for i in order[:5]
        ],
    }
    if reference is not None:
        out["kl_to_reference"] = kl(q, reference)
        out["kl_reference_to_model"] = kl(reference, q)
    return out


def per_step_gamma(a: Archive, base: str, other: str) -> dict:
    """Pooled per-step gamma over every candidate step (full-vocabulary rows)."""
    s = a.samples()
    rows = [
        (
            a.model(base).rows(i, slice(0, int(s["length"][i]))),
            a.model(other).rows(i, slice(0, int(s["length"][i]))),
        )
        for i in range(a.n_complete)
    ]
    p = np.concatenate([r[0] for r in rows]).astype(np.float32)
    q = np.concatenate([r[1] for r in rows]).astype(np.float32)
    groups = np.concatenate([np.full(len(r[0]), i) for i, r in enumerate(rows)])
    g = K.fit_gamma_pooled(p, q, groups=groups, n_boot=500)
    return {
        "gamma": float(g.gamma),
        "ci95": [float(g.ci_low), float(g.ci_high)],
        "n_steps": int(len(p)),
    }


def sampled_check(a: Archive, samples_path: str, exact: np.ndarray, Ns, seed: int) -> dict:
    """KL(sampled frequencies || exact distribution) over candidates + "outside", at growing N,
    with the KL of multinomial draws from the exact distribution at the same N (noise)."""
    with Archive(samples_path) as b:
        if b.model().prompt_tokens(0) != a.model().prompt_tokens(0):
            raise EngineError(
                f"{samples_path} read another prompt (or another rendering of it) "
                f"than the candidates archive"
            )
        sb = b.samples()
        got = [
            tuple(int(t) for t in sb["tokens"][i, : int(sb["length"][i])])
            for i in range(b.n_complete)
        ]
    s = a.samples()
    index = {
        tuple(int(t) for t in s["tokens"][i, : int(s["length"][i])]): i for i in range(a.n_complete)
    }
    hits = np.array([index.get(g, len(index)) for g in got])  # last bin: outside the set
    probs = np.append(exact, max(0.0, 1 - exact.sum()))
    rng = np.random.default_rng(seed)
    out = []
    for N in [n for n in Ns if n <= len(hits)] + ([len(hits)] if len(hits) not in Ns else []):
        f = np.bincount(hits[:N], minlength=len(probs)) / N
        noise = [kl(rng.multinomial(N, probs) / N, probs) for _ in range(200)]
        out.append(
            {
                "n": int(N),
                "kl_sampled_to_exact": kl(f, probs),
                "kl_multinomial_noise_mean": float(np.mean(noise)),
                "kl_multinomial_noise_95": float(np.quantile(noise, 0.95)),
            }
        )
    return {
        "archive": str(samples_path),
        "n_samples": int(len(hits)),
        "share_outside_set": float(np.mean(hits == len(index))),
        "by_n": out,
    }


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    ans = a.answers()
    if ans is None:
        raise EngineError("answers needs an archive from `python -m engine answers` (no /answers)")
    cands, ref = ans["candidates"], ans["reference"]
    ref = None if ref is None else ref / ref.sum()
    lp = {k: candidate_logp(a, k) for k in a.models}
    base = a.generator
    summary = {
        "candidates": len(cands),
        "terminator": ans["terminator"],
        "source": ans["source"],
        "models": {k: model_report(cands, v, ref) for k, v in lp.items()},
        "pairs": {},
    }
    for k in lp:
        if k == base:
            continue
        qb, qo = (np.exp(lp[x] - lp[x].max()) for x in (base, k))
        qb, qo = qb / qb.sum(), qo / qo.sum()
        g = K.fit_gamma(lp[base][None].astype(np.float64), lp[k][None].astype(np.float64))
        summary["pairs"][f"{base} vs {k}"] = {
            "kl_base_to_other": kl(qb, qo),
            "kl_other_to_base": kl(qo, qb),
            "gamma_sequence_level_exact": float(g.gamma[0]),
            "kl_at_gamma": float(g.kl[0]),
            "kl_at_1": float(g.kl_at_1[0]),
            "gamma_per_step_pooled": per_step_gamma(a, base, k),
        }
    if c.samples:
        summary["sampled_vs_exact"] = sampled_check(
            a, str(c.samples), np.exp(lp[base]), list(c.sample_ns), int(c.seed)
        )
    write_csv(
        out,
        "candidates.csv",
        {
            "answer": cands,
            **{f"logp_{k}": v for k, v in lp.items()},
            **({"reference": ref} if ref is not None else {}),
        },
    )
    summary["figures"] = bars(cands, lp, ref, base, out) + convergence(
        summary.get("sampled_vs_exact"), out
    )
    return summary


def bars(cands, lp: dict, ref, base: str, out: Path, top: int = 25) -> list[str]:
    q = {k: np.exp(v - v.max()) / np.exp(v - v.max()).sum() for k, v in lp.items()}
    order = np.argsort(-q[base])[:top]
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * len(order) + 2), 4))
    width = 0.8 / len(q)
    for j, (k, v) in enumerate(q.items()):
        ax.bar(np.arange(len(order)) + j * width, v[order], width, label=k)
    if ref is not None:
        ax.plot(np.arange(len(order)) + 0.4 - width / 2, ref[order], "k_", ms=12, label="reference")
    ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2)
    ax.set_xticklabels([cands[i] for i in order], rotation=70, fontsize=7)
    ax.set_ylabel("P(answer | answer in the set)")
    ax.set_title(
        f"Exact answer distributions, sorted by {base}"
        + (f" (top {top})" if len(cands) > top else ""),
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return save_figure(fig, out, "answer_distributions")


def convergence(check, out: Path) -> list[str]:
    if not check or not check["by_n"]:
        return []
    n = [r["n"] for r in check["by_n"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(
        n,
        [max(r["kl_sampled_to_exact"], 1e-12) for r in check["by_n"]],
        "o-",
        label="sampled vs exact",
    )
    ax.loglog(
        n,
        [r["kl_multinomial_noise_mean"] for r in check["by_n"]],
        "k:",
        label="multinomial noise (mean)",
    )
    ax.loglog(
        n,
        [r["kl_multinomial_noise_95"] for r in check["by_n"]],
        "k--",
        lw=0.8,
        label="multinomial noise (95th percentile)",
    )
    ax.set_xlabel("samples N")
    ax.set_ylabel("KL(frequencies ‖ exact) (nats)")
    ax.set_title("Sampled answer frequencies converge to the exact distribution", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out, "sampled_vs_exact")


def terminal_lines(s: dict) -> list[str]:
    out = [
        f"{k}: entropy {m['entropy_nats']:.3f} of {m['max_entropy_nats']:.3f} nats, 50%/90% of "
        f"the mass in {m['coverage_50']}/{m['coverage_90']} answers, outside the set "
        f"{m['mass_outside_set']:.3f}"
        for k, m in s["models"].items()
    ]
    out += [
        f"{k}: exact sequence-level gamma {v['gamma_sequence_level_exact']:.3f}, per-step "
        f"{v['gamma_per_step_pooled']['gamma']:.3f}"
        for k, v in s["pairs"].items()
    ]
    for r in (s.get("sampled_vs_exact") or {}).get("by_n", []):
        out.append(
            f"N={r['n']}: KL(sampled || exact) {r['kl_sampled_to_exact']:.4f} "
            f"(noise {r['kl_multinomial_noise_mean']:.4f})"
        )
    return out


ANALYSIS = Analysis(name="answers", run=run, terminal_lines=terminal_lines)
