"""Paired report: how the aligned model's next-token distributions differ from the base's on
identical contexts (every stored step of a scored archive).

- llama.cpp `--kl-divergence` style: KL(base || aligned) mean ± standard error, percentiles,
  min/max; "same top p" (argmax agreement ± binomial error); Δp of the sampled token
  (aligned − base: mean, RMS); KL(aligned || base) too; KL by position (Qi et al. 2025 find it
  concentrated in the first tokens).
- Token shift (Lin et al. 2023, URIAL): the base model's rank of the aligned model's top token
  per step: unshifted (1), marginal (2-3), shifted (> 3).
- gamma (Zhang et al. 2025: pi_aligned ∝ pi_base**gamma, gamma = 1 + alpha/beta): per-step fit
  `fit_gamma`, pooled gamma with a bootstrap interval over completions, share of KL explained
  by the power, and the sequence-level gamma: per prompt, the OLS slope of log pi_aligned(y)
  on log pi_base(y) over its completions y.  The two differ (lookahead normaliser): per-step
  gamma is a token-level tempering exponent, sequence-level gamma the power of the paper.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib.common import (
    completion_ci,
    finite_rows,
    position_bands,
    save_figure,
    write_csv,
)
from analyses.lib.pairing import moments_pass, pick_models, provenance_of
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.errors import EngineError
from engine.stream import map_pairs
from kernels import columns as GB

CAVEAT = (
    "gamma is a sequence-level power in the theory (pi* ∝ pi_ref**gamma over whole "
    "responses); per-step gamma fits next-token distributions and estimates a token-level "
    "tempering exponent, which differs because of the lookahead normaliser. Both are "
    "reported; compare like with like."
)


def rows_report(p, q, tokens):
    """Everything per row from three kernels: pair_stats (divergences, token shift rank,
    token log-probs), gamma_base (one pass over p and q, shared by the per-step and pooled
    fits; its log S_p - E_p[d] is p's entropy) and fit_gamma's Halley passes."""
    base = K.gamma_base(p, q)
    s = K.pair_stats(p, q, tokens)
    g = K.fit_gamma(p, q, base=base)
    return {
        **s._asdict(),
        "gamma": g.gamma,
        "gamma_kl": g.kl,
        "kl_at_1": g.kl_at_1,
        "gamma_base": base,
        "base_entropy": base[:, GB.LOG_S] - base[:, GB.M1],
    }


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    base, aligned, chosen = pick_models(a, c)
    r, sample, step = map_pairs(a, rows_report, base, aligned, progress=cfg.progress)
    # both directions: numba's kl_pq stays finite when p holds a NaN entry (kl_qp does not)
    r, sample, step, skipped = finite_rows(r, sample, step, "kl_pq")
    r, sample, step, skipped_qp = finite_rows(r, sample, step, "kl_qp")
    skipped += skipped_qp
    n = len(sample)
    if n == 0:
        raise EngineError("no stored rows to compare")
    kl = r["kl_pq"]
    agree = r["argmax_agree"]
    pct = {str(q): float(np.percentile(kl, q)) for q in c.percentiles}
    summary = {
        "base": base,
        "aligned": aligned,
        "aligned_chosen": chosen,
        "n_rows": int(n),
        "skipped_nonfinite_rows": skipped,
        "base_provenance": provenance_of(a, base),
        "aligned_provenance": provenance_of(a, aligned),
        "kl_base_aligned": {
            "mean": float(kl.mean()),
            "stderr": float(kl.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "min": float(kl.min()),
            "max": float(kl.max()),
            "percentiles": pct,
            # rows of one completion are dependent: the interval resamples completions
            "ci95": completion_ci(kl, sample, int(c.n_boot), int(c.seed)),
        },
        "kl_aligned_base": {"mean": float(r["kl_qp"].mean())},
        "js": {"mean": float(r["js"].mean())},
        "tv": {"mean": float(r["tv"].mean())},
        "same_top_p": {
            "mean": float(agree.mean()),
            "stderr": float(np.sqrt(agree.mean() * (1 - agree.mean()) / n)),
        },
        "delta_p_sampled": {
            "mean": float(r["dp"].mean()),
            "rms": float(np.sqrt(np.mean(r["dp"] ** 2))),
        },
        "token_shift": shift_classes(r["q_top_rank_in_p"]),
    }
    summary["gamma"] = gamma_report(a, r, sample, step, base, aligned, c)
    summary["gamma"]["caveat"] = CAVEAT
    summary["kl_by_position"] = by_position(step, kl)
    bands = position_bands(kl, sample, step, int(c.n_boot), int(c.seed))
    summary["kl_by_position_ci95"] = {
        str(t): b for t, (b, n) in enumerate(zip(bands["ci95"], bands["n_completions"])) if n
    }
    write_csv(
        out,
        "per_step.csv",
        {
            "sample": sample,
            "step": step,
            "kl_base_aligned": kl,
            "kl_aligned_base": r["kl_qp"],
            "js": r["js"],
            "tv": r["tv"],
            "argmax_agree": agree,
            "delta_p": r["dp"],
            "gamma": r["gamma"],
            "base_rank_of_aligned_top": r["q_top_rank_in_p"].astype(int),
            "base_entropy": r["base_entropy"],
        },
    )
    summary["figures"] = figures(r, step, summary, out, base, aligned)
    return summary


def shift_classes(rank) -> dict:
    n = len(rank)
    return {
        "unshifted": float(np.mean(rank == 1)),
        "marginal": float(np.mean((rank >= 2) & (rank <= 3))),
        "shifted": float(np.mean(rank > 3)),
        "n": int(n),
    }


def by_position(step, values) -> dict:
    return {int(t): float(values[step == t].mean()) for t in np.unique(step)}


def gamma_report(a, r, sample, step, base, aligned, c) -> dict:
    g = r["gamma"]
    ok = np.isfinite(g)
    kl1, klg = r["kl_at_1"][ok], r["gamma_kl"][ok]

    # pooled over all rows, bootstrap over completions (rows of one completion are dependent);
    # streamed: the per-row base came with the report, each Newton step is one pass over base
    pooled = K.pooled_from_moments(
        r["gamma_base"],
        moments_pass(a, base, sample, step),
        groups=sample,
        n_boot=int(c.n_boot),
        seed=int(c.seed),
    )
    seq = sequence_gamma(a, r["logp_token"], r["logq_token"], sample)
    return {
        "per_step": {
            "median": float(np.median(g[ok])) if ok.any() else float("nan"),
            "mean": float(g[ok].mean()) if ok.any() else float("nan"),
            "iqr": [float(np.percentile(g[ok], 25)), float(np.percentile(g[ok], 75))]
            if ok.any()
            else [],
            "n_identified": int(ok.sum()),
        },
        "pooled": {
            "gamma": pooled.gamma,
            "ci95": [pooled.ci_low, pooled.ci_high],
            "kl_at_gamma": pooled.kl,
            "kl_at_1": pooled.kl_at_1,
            "kl_explained": 1 - pooled.kl / pooled.kl_at_1 if pooled.kl_at_1 > 0 else float("nan"),
        },
        "per_step_kl_explained": float(1 - klg.sum() / kl1.sum())
        if kl1.sum() > 0
        else float("nan"),
        "sequence_level": seq,
        "sequence_level_pooled": sequence_gamma_pooled(
            a, r["logp_token"], r["logq_token"], sample, int(c.n_boot), int(c.seed)
        ),
    }


def sequence_gamma(a: Archive, lp_base, lp_aligned, sample) -> dict:
    """Per prompt: slope of log pi_aligned(y) on log pi_base(y) over its completions."""
    s = a.samples()
    n = a.n_complete
    lb = np.bincount(sample, lp_base, minlength=n)
    la = np.bincount(sample, lp_aligned, minlength=n)
    out = {}
    for p, text in enumerate(a.prompts):
        sel = s["prompt_index"][:n] == p
        if sel.sum() >= 3 and np.var(lb[sel]) > 0:
            slope, intercept = np.polyfit(lb[sel], la[sel], 1)
            out[text] = {"gamma": float(slope), "intercept": float(intercept), "n": int(sel.sum())}
    return out


def sequence_gamma_pooled(a: Archive, lp_base, lp_aligned, sample, n_boot: int, seed: int) -> dict:
    """One sequence-level gamma over all prompts: the within-prompt OLS slope of
    log pi_aligned(y) on log pi_base(y) (prompt fixed effects: both centred per prompt, since
    the theory's log-normaliser depends on the prompt), with a 95% percentile interval from
    resampling prompts.  Prompts with fewer than 2 completions carry no slope."""
    s = a.samples()
    n = a.n_complete
    lb = np.bincount(sample, lp_base, minlength=n)
    la = np.bincount(sample, lp_aligned, minlength=n)
    prompt = s["prompt_index"][:n]
    sxx, sxy = [], []
    for p in np.unique(prompt):
        sel = prompt == p
        if sel.sum() >= 2:
            xc, yc = lb[sel] - lb[sel].mean(), la[sel] - la[sel].mean()
            sxx.append(float(xc @ xc))
            sxy.append(float(xc @ yc))
    sxx, sxy = np.array(sxx), np.array(sxy)
    if not sxx.size or sxx.sum() <= 0:
        return {
            "gamma": float("nan"),
            "ci95": [float("nan"), float("nan")],
            "n_prompts": int(sxx.size),
        }
    rng = np.random.default_rng(seed)
    boot = [
        sxy[i].sum() / sxx[i].sum()
        for i in (rng.integers(0, sxx.size, sxx.size) for _ in range(n_boot))
        if sxx[i].sum() > 0
    ]
    return {
        "gamma": float(sxy.sum() / sxx.sum()),
        "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "n_prompts": int(sxx.size),
        "n_completions": int(n),
    }


def figures(r, step, summary, out: Path, base: str, aligned: str) -> list[str]:
    figs = []
    pos = summary["kl_by_position"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(pos), list(pos.values()), marker=".")
    ax.set_xlabel("generated step")
    ax.set_ylabel(f"mean KL({base} ‖ {aligned}) (nats)")
    ax.set_title("Per-step KL against position")
    figs += save_figure(fig, out, "kl_by_position")
    g = r["gamma"][np.isfinite(r["gamma"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(g, bins=60, color="tab:purple")
    ax.axvline(summary["gamma"]["pooled"]["gamma"], c="k", ls="--", label="pooled γ")
    ax.set_xlabel("per-step γ (aligned ∝ base^γ)")
    ax.set_ylabel("steps")
    ax.legend(fontsize=7)
    ax.set_title(f"Per-step γ: {aligned} vs {base}")
    figs += save_figure(fig, out, "gamma_histogram")
    ok = np.isfinite(r["gamma"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    gp = by_position(step[ok], r["gamma"][ok])
    axes[0].plot(list(gp), list(gp.values()), marker=".")
    axes[0].set_xlabel("generated step")
    axes[0].set_ylabel("mean per-step γ")
    axes[1].scatter(r["base_entropy"][ok], r["gamma"][ok], s=3, alpha=0.4)
    axes[1].set_xlabel(f"base entropy (nats), {base}")
    axes[1].set_ylabel("per-step γ")
    fig.suptitle("γ against position and base entropy")
    figs += save_figure(fig, out, "gamma_by_position_and_entropy")
    return figs


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    g = s["gamma"]["pooled"]
    return [
        f"{s['base']} vs {s['aligned']} ({s['aligned_chosen']}), {s['n_rows']} steps",
        f"KL(base || aligned) {s['kl_base_aligned']['mean']:.4f} ± "
        f"{s['kl_base_aligned']['stderr']:.4f} nats/step; same top token "
        f"{100 * s['same_top_p']['mean']:.1f}%",
        f"pooled gamma {g['gamma']:.4f} [{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}]",
    ]


ANALYSIS = Analysis(name="pair", run=run, terminal_lines=terminal_lines)
