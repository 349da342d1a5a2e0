"""Can temperature undo the sharpening?  Exactly, from a scored archive's stored rows.

If the aligned model were the base model raised to a power gamma token by token
(pi_aligned ∝ pi_base**gamma), sampling it at temperature T = gamma would give back the base
model's next-token distributions.  On every stored step (identical contexts for both models):

- `t_entropy` (T*): the temperature at which the aligned model's mean per-step entropy equals
  the base model's on the same tokens: the bracket from the grid, then Brent's method, one
  streamed pass over the aligned rows per evaluation; its 95% interval is a one-step
  (linearised) bootstrap over completions, as `kernels.pooled` does for gamma.
- `t_kl`: argmin over T of the mean KL(base ‖ aligned at T): the pooled fit of
  `kernels.pooled_from_moments` with the roles swapped (the aligned model tempered to match
  the base; convex in 1/T), with its bootstrap interval over completions.
- `gamma_pooled` (γ̂): the `pair` analysis's pooled per-step gamma, argmin KL(aligned ‖ base^γ);
  T = γ̂ is the tempering the power law predicts.
- the curve over a grid of T of the aligned model's mean entropy (`kernels.tempered_entropy`'s
  moments) and of the mean KL(base ‖ aligned at T); KL(p ‖ q^g/S) = E_p[log p] - g E_p[d_q] +
  log S_q(g) with d_q the aligned logits minus their max (`kernels.columns`).

Matching the entropy per step is a token-level repair: gamma is a sequence-level power in the
theory (Zhang et al. 2025), and a model sampled at T* is not the base model over whole texts
(Karan & Du 2025).  Whether it restores diversity per text is measured by sampling the
aligned model at T* and at γ̂ (`engine dump ... temperature=T`) and comparing the dumps'
`diversity` with the base model's own (`analysis.reference=`; docs/analyses.md).  Run the
same analysis on the control twin (alpha = 0) for the noise floor.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import brentq

import kernels as K
from analyses.lib.common import finite_rows, save_figure, write_csv
from analyses.lib.pairing import moments_pass, pick_models, provenance_of
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.errors import EngineError
from engine.stream import map_pairs
from kernels import columns as C


def temperature_grid(c) -> np.ndarray:
    """The temperatures of the curve: `n_t` points, geometric from t_min to t_max, with 1."""
    t_min, t_max, n = float(c.t_min), float(c.t_max), int(c.n_t)
    if not (0 < t_min < 1 < t_max) or n < 3:
        raise EngineError(
            f"analysis.t_min < 1 < analysis.t_max, both > 0, and n_t >= 3 are needed; got "
            f"t_min={t_min}, t_max={t_max}, n_t={n}"
        )
    return np.unique(np.append(np.geomspace(t_min, t_max, n), 1.0))


def rows_report(gammas):
    """Per row, one pass over both models: the base entropy, `gamma_base` both ways (aligned
    tempered towards base for KL(base ‖ aligned at T); base towards aligned for γ̂) and the
    aligned model's tempered moments at every grid point."""

    def report(p, q, tokens):
        return {
            "base_entropy": K.entropy(p),
            "aligned_entropy": K.entropy(q),
            "gb_aligned": K.gamma_base(q, p),
            "gb_base": K.gamma_base(p, q),
            "moments": K.tempered_moments(q, gammas),
        }

    return report


def entropy_at(m: np.ndarray, g) -> np.ndarray:
    """H(softmax(g d)) = log S(g) - g E_g[d] from tempered moments [..., 4]."""
    return m[..., C.TM_LOG_S] - g * m[..., C.TM_M1]


def kl_at(gb: np.ndarray, m: np.ndarray, g) -> np.ndarray:
    """KL(base ‖ aligned at 1/g) per row from `gamma_base(aligned, base)` and the aligned
    model's tempered moments at g."""
    gb = gb[:, None] if m.ndim == 3 else gb
    return gb[..., C.Q_LOGQ] - g * gb[..., C.Q_DP] + m[..., C.TM_LOG_S]


def solve_t_entropy(moments_at, h_base, sample, grid, h_grid, n_boot, seed, xtol) -> dict:
    """T* with mean_rows H(aligned at T*) = mean_rows H(base), and its linearised bootstrap
    interval over completions (`kernels.one_step_bootstrap`, as the pooled gamma's): at T*
    each completion's sum of H_aligned(T*) - H_base is the score, its sum of dH/dT the
    curvature."""
    target = float(h_base.mean())
    gap = h_grid - target  # increasing in T
    if not (gap[0] <= 0 <= gap[-1]):
        side = "below" if gap[0] > 0 else "above"
        return {
            "t": float("nan"),
            "ci95": [float("nan"), float("nan")],
            "found": False,
            "reason": f"the base entropy is {side} the aligned model's over T in "
            f"[{grid[0]:.3g}, {grid[-1]:.3g}]: widen analysis.t_min / t_max",
        }
    i = int(np.searchsorted(gap, 0.0))
    if gap[i] == 0:
        t = float(grid[i])
    else:
        lo, hi = float(grid[i - 1]), float(grid[i])
        try:
            t = brentq(
                lambda T: entropy_at(moments_at(1 / T), 1 / T).mean() - target, lo, hi, xtol=xtol
            )
        except ValueError:  # the re-evaluated ends differ from the grid's in the last bits
            t = float(grid[i - 1] if -gap[i - 1] < gap[i] else grid[i])
    g = 1 / t
    m = np.asarray(moments_at(g))
    h = entropy_at(m, g)
    # dH/dg = -g Var_g[d]; dT = -dg / g**2, so dH/dT = g**3 Var_g[d]
    slope = g**3 * (m[:, C.TM_M2] - m[:, C.TM_M1] ** 2)
    lo_hi = K.one_step_bootstrap(t, h - h_base, slope, sample, n_boot, 0.05, seed)
    return {
        "t": float(t),
        "ci95": list(lo_hi),
        "found": True,
        "residual_nats": float(h.mean() - target),
        "xtol": xtol,
    }


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    base, aligned, chosen = pick_models(a, c)
    grid = temperature_grid(c)
    gammas = 1 / grid
    r, sample, step = map_pairs(a, rows_report(gammas), base, aligned, progress=cfg.progress)
    # a row non-finite in either model (another writer's file) is left out of every number
    r["finite"] = np.where(
        np.isfinite(r["aligned_entropy"])
        & np.isfinite(r["moments"]).all(axis=(1, 2))
        & np.isfinite(r["gb_aligned"][:, [C.Q_DP, C.Q_LOGQ]]).all(1)
        & np.isfinite(r["gb_base"][:, [C.Q_DP, C.Q_LOGQ]]).all(1),
        r["base_entropy"],
        np.nan,
    )
    r, sample, step, skipped = finite_rows(r, sample, step, "finite")
    if len(sample) == 0:
        raise EngineError("no stored rows to compare")
    n_boot, seed = int(c.n_boot), int(c.seed)
    h_grid = entropy_at(r["moments"], gammas).mean(0)
    kl_grid = kl_at(r["gb_aligned"], r["moments"], gammas).mean(0)
    at_aligned = moments_pass(a, aligned, sample, step)
    t_star = solve_t_entropy(
        at_aligned, r["base_entropy"], sample, grid, h_grid, n_boot, seed, float(c.xtol)
    )
    fit_kl = K.pooled_from_moments(
        r["gb_aligned"], at_aligned, groups=sample, n_boot=n_boot, seed=seed
    )
    fit_g = K.pooled_from_moments(
        r["gb_base"], moments_pass(a, base, sample, step), groups=sample, n_boot=n_boot, seed=seed
    )
    marks = {"1": 1.0, "gamma_pooled": fit_g.gamma, "t_kl": 1 / fit_kl.gamma}
    if t_star["found"]:
        marks["t_entropy"] = t_star["t"]
    at = {}
    for name, t in marks.items():
        m = np.asarray(at_aligned(1 / t))
        at[name] = {
            "temperature": float(t),
            "aligned_entropy_mean": float(entropy_at(m, 1 / t).mean()),
            "kl_base_aligned_mean": float(kl_at(r["gb_aligned"], m, 1 / t).mean()),
        }
    summary = {
        "base": base,
        "aligned": aligned,
        "aligned_chosen": chosen,
        "n_rows": int(len(sample)),
        "n_completions": int(np.unique(sample).size),
        "skipped_nonfinite_rows": skipped,
        "base_provenance": provenance_of(a, base),
        "aligned_provenance": provenance_of(a, aligned),
        "base_entropy_mean": float(r["base_entropy"].mean()),
        "aligned_entropy_mean": at["1"]["aligned_entropy_mean"],
        "t_entropy": t_star,
        "t_kl": {
            "t": 1 / fit_kl.gamma,
            # 1/g is decreasing; a linearised interval of g reaching 0 has no upper end in T
            "ci95": [
                1 / fit_kl.ci_high if fit_kl.ci_high > 0 else float("nan"),
                1 / fit_kl.ci_low if fit_kl.ci_low > 0 else float("nan"),
            ],
            "kl_at_t": fit_kl.kl,
            "kl_at_1": fit_kl.kl_at_1,
        },
        "gamma_pooled": {
            "gamma": fit_g.gamma,
            "ci95": [fit_g.ci_low, fit_g.ci_high],
            "kl_at_gamma": fit_g.kl,
            "kl_at_1": fit_g.kl_at_1,
        },
        "at_temperature": at,
        "curve": {
            "temperature": grid,
            "aligned_entropy_mean": h_grid,
            "kl_base_aligned_mean": kl_grid,
        },
    }
    write_csv(
        out,
        "curve.csv",
        {"temperature": grid, "aligned_entropy_mean": h_grid, "kl_base_aligned_mean": kl_grid},
    )
    summary["figures"] = figure(summary, out)
    return summary


def figure(s: dict, out: Path) -> list[str]:
    """Entropy and KL against the aligned model's temperature, with the base model's entropy
    and the three temperatures marked (KL on a log axis: its minimum is what matters)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    cv = s["curve"]
    t = np.asarray(cv["temperature"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.plot(t, cv["aligned_entropy_mean"], color="tab:red", label=f"aligned ({s['aligned']}) at T")
    ax.axhline(
        s["base_entropy_mean"], color="tab:blue", ls="--", label=f"base ({s['base']}), T = 1"
    )
    ax.set_ylabel("mean entropy per step (nats)")
    ax.set_title("Entropy of the aligned model at T", fontsize=9)
    kl = np.maximum(np.asarray(cv["kl_base_aligned_mean"], np.float64), 1e-12)
    axes[1].semilogy(t, kl, color="tab:purple", label="KL(base ‖ aligned at T)")
    pts = sorted(
        (v["temperature"], max(v["kl_base_aligned_mean"], 1e-12))
        for v in s["at_temperature"].values()
    )
    axes[1].plot(*zip(*pts, strict=True), "o", color="tab:purple", ms=3, label="exact at the marks")
    axes[1].set_ylabel("mean KL per step (nats, log scale)")
    axes[1].set_title("KL(base ‖ aligned at T)", fontsize=9)
    marks = [
        ("T* (entropy matched)", s["t_entropy"].get("t"), "k"),
        ("argmin KL", s["t_kl"]["t"], "tab:green"),
        ("pooled γ̂", s["gamma_pooled"]["gamma"], "tab:orange"),
    ]
    ticks = [x for x in (0.5, 0.7, 1, 1.5, 2, 3, 4, 6, 8) if t[0] <= x <= t[-1]]
    for ax in axes:
        for label, x, colour in marks:
            if x is not None and np.isfinite(x):
                ax.axvline(x, color=colour, ls=":", lw=1.2, label=f"{label} = {x:.3f}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("temperature T of the aligned model (log scale)")
        ax.legend(fontsize=7)
    fig.suptitle("Can temperature undo the sharpening? (exact, from stored logits)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, "mitigation_temperature")


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    t, k, g = s["t_entropy"], s["t_kl"], s["gamma_pooled"]
    first = (
        f"T* {t['t']:.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}]"
        if t["found"]
        else f"T* not found: {t['reason']}"
    )
    return [
        f"{s['base']} vs {s['aligned']}, {s['n_rows']} steps: mean entropy "
        f"{s['base_entropy_mean']:.4f} vs {s['aligned_entropy_mean']:.4f} nats",
        f"{first}; argmin KL at T {k['t']:.4f} [{k['ci95'][0]:.4f}, {k['ci95'][1]:.4f}]; "
        f"pooled gamma {g['gamma']:.4f} [{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}]",
    ]


ANALYSIS = Analysis(name="mitigation", run=run, terminal_lines=terminal_lines)
