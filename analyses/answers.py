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
next to the KL that multinomial noise alone gives at that N (simulated from the exact P), and
the same sampled answers are scored the way Verbalized Sampling's published code scores them
(`vs_metrics`: their normalisation, KL over the observed answers only, coverage-N, precision;
Zhang et al. 2025, arXiv:2510.01171), next to this archive's exact full-support numbers.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib.common import save_figure, write_csv
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.archive.format import FINISH_REASONS
from engine.errors import EngineError
from engine.stream import map_rows

EOS = FINISH_REASONS["eos"]  # /samples/finish_reason of a sample that ended on EOS
#: Verbalized Sampling's smoothing constant (`epsilon = 1e-10` in both functions cited below)
VS_EPS = 1e-10
#: where `vs_metrics` takes each definition from (CHATS-lab/verbalized-sampling, release 0.1.3)
VS_SOURCE = (
    "Zhang et al. 2025 (arXiv:2510.01171), CHATS-lab/verbalized-sampling 0.1.3: "
    "verbalized_sampling/analysis/evals/response_count.py (ResponseCountEvaluator) and "
    "analyse/pre_training_distribution/calc_kl_divergence_vs.py (calc_kl_divergence)"
)


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


def vs_normalise(text: str) -> str:
    """An answer as Verbalized Sampling's code compares it: lower-cased, trailing whitespace
    stripped, then every trailing "." (`text.lower().rstrip().rstrip(".")` in
    `ResponseCountEvaluator.compute_instance_metric` and `check_precision`, applied to the
    responses and the ground-truth answers alike).  Leading whitespace stays, as there: " Ohio"
    is no match for "Ohio"."""
    return text.lower().rstrip().rstrip(".")


def vs_metrics(answers: list[str], candidates: list[str], reference=None) -> dict:
    """Verbalized Sampling's open-ended-QA numbers for one prompt's sampled answers, computed as
    their published code computes them (CHATS-lab/verbalized-sampling, release 0.1.3), so that
    an archive's samples can be put next to the paper's tables:

    - answers and candidates are normalised by `vs_normalise`; an answer is *correct* when it
      equals a normalised candidate (`check_precision`), and correct answers are counted per
      candidate (`re_group`; here each candidate is its own group of one spelling);
    - `precision` = correct answers / all answers (`aggregate_metrics`:
      `num_correct_responses / len(group)`);
    - `coverage_n` = distinct correct answers / number of candidates (`unique_recall_rate`);
    - `kl_to_uniform` (`_calculate_kl_divergence`): over the *observed* correct answers only,
      p_i = c_i / T + eps renormalised (T = the number of answers, which is what their
      `max(num_responses_per_prompt, sum(counts))` is when every response of the prompt is
      counted), KL = sum_i p_i log(p_i / (1/N)) with N the set size; 0.0 when nothing is correct;
    - `kl_reference_to_observed` (`calc_kl_divergence(gt_data, data)` in
      analyse/pre_training_distribution/calc_kl_divergence_vs.py, the paper's "KL from
      pretraining distribution" of the US-states figure): KL(reference || observed) -- the
      reference first -- over the candidates that were both observed and in the reference,
      both vectors + eps and renormalised over those candidates; the observed vector is the
      answers' frequencies (count / all answers, as their `read_direct_data`); 0.0 without
      overlap.  Only when `reference` (weights over `candidates`) is given.

    Neither KL sees the answers the model never produced, unlike the exact full-support KLs of
    `model_report`: `kl_to_uniform` is the plug-in log N - H(frequencies of the correct
    answers), which reaches the exact value only as the samples grow (from above on average:
    the plug-in entropy is biased low), and `kl_reference_to_observed` drops the reference
    mass of every candidate never sampled, so a model that always gives the same answer scores
    0 there while its exact KL(reference || model) is large."""
    index: dict[str, int] = {}
    for i, c in enumerate(candidates):
        k = vs_normalise(c)
        if k in index:
            raise EngineError(
                f"candidates {candidates[index[k]]!r} and {c!r} are the same answer after "
                f"Verbalized Sampling's normalisation (lower-case, trailing spaces and dots)"
            )
        index[k] = i
    n, N = len(answers), len(candidates)
    if n == 0:
        raise EngineError("no sampled answers to score")
    hits = [index[k] for k in map(vs_normalise, answers) if k in index]
    counts = np.bincount(np.array(hits, dtype=np.int64), minlength=N).astype(np.float64)
    seen = counts > 0
    correct = int(counts.sum())
    kl_u = 0.0
    if correct:
        p = counts[seen] / max(n, correct) + VS_EPS
        p = p / p.sum()
        kl_u = float(np.sum(p * np.log(p / (1.0 / N))))
    out = {
        "n_responses": n,
        "n_correct": correct,
        "n_distinct_correct": int(seen.sum()),
        "precision": correct / n,
        "coverage_n": float(seen.sum() / N),
        "kl_to_uniform": kl_u,
    }
    if reference is not None:
        ref = np.asarray(reference, np.float64)
        kl_r = 0.0
        if seen.any():
            g = ref[seen] / ref.sum() + VS_EPS
            q = counts[seen] / n + VS_EPS
            g, q = g / g.sum(), q / q.sum()
            kl_r = float(np.sum(g * np.log(g / q)))
        out["kl_reference_to_observed"] = kl_r
    return out


def sampled_texts(b: Archive) -> list[str]:
    """Each complete sample's text (its generator's tokenizer record), without a final EOS."""
    s, text = b.samples(), b.model().text
    return [
        text(s["tokens"][i, : int(s["length"][i]) - int(s["finish_reason"][i] == EOS)])
        for i in range(b.n_complete)
    ]


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


def sampled_check(
    a: Archive, samples_path: str, exact: np.ndarray, Ns, seed: int, exact_report: dict
) -> dict:
    """KL(sampled frequencies || exact distribution) over candidates + "outside", at growing N,
    with the KL of multinomial draws from the exact distribution at the same N (noise); and
    `vs_style`: the samples scored by Verbalized Sampling's definitions (`vs_metrics`, matching
    by normalised text) next to the exact full-support numbers of `exact_report` (the
    generator's `model_report`) and the coverage-N that n draws from the exact P would give on
    average, 1/N sum_i (1 - (1 - P_i)^n)."""
    ans = a.answers()
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
        texts = sampled_texts(b)
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
    ref = ans["reference"]
    vs = {"source": VS_SOURCE, **vs_metrics(texts, ans["candidates"], ref)}
    vs["exact"] = {
        k: exact_report[k]
        for k in ("kl_to_uniform", "kl_to_reference", "kl_reference_to_model", "mass_in_set")
        if k in exact_report
    }
    vs["exact"]["expected_coverage_n"] = float(np.mean(1 - (1 - exact) ** len(texts)))
    return {
        "archive": str(samples_path),
        "n_samples": int(len(hits)),
        "share_outside_set": float(np.mean(hits == len(index))),
        "by_n": out,
        "vs_style": vs,
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
        "prompt": a.prompts[0],
        "prompt_variant": ans["prompt_variant"],
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
            a,
            str(c.samples),
            np.exp(lp[base]),
            list(c.sample_ns),
            int(c.seed),
            summary["models"][base],
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
    out = [f"prompt ({s.get('prompt_variant') or 'custom'}): {s.get('prompt', '')!r}"]
    out += [
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
    vs = (s.get("sampled_vs_exact") or {}).get("vs_style")
    if vs:
        out.append(
            f"Verbalized Sampling's way ({vs['n_responses']} samples): precision "
            f"{vs['precision']:.3f}, coverage-N {vs['coverage_n']:.3f} "
            f"(exact expectation {vs['exact']['expected_coverage_n']:.3f}), KL to uniform over "
            f"the observed answers {vs['kl_to_uniform']:.3f} (exact, full support "
            f"{vs['exact']['kl_to_uniform']:.3f})"
        )
    return out


ANALYSIS = Analysis(name="answers", run=run, terminal_lines=terminal_lines)
