"""Attractor states: perturbed continuations against their matched controls.

Reads an archive written by `python -m engine perturb`: prompts come in (control, variant)
pairs, and continuation j of a variant shares its seed with continuation j of its control.
- Rendering: every continuation coloured by the probability of each sampled token (red = low,
  green = high), the paper's attractor figure, as HTML (text) and PNG (heatmap, rows =
  trajectories, columns = steps since the edit).
- The edit's influence on identical continuation tokens (`analyses.lib.influence`), when the
  archive has a `<generator>@counterpart` group (`python -m engine score archive=P
  counterpart=true`): I(t) = KL(p(. | edited prefix, y<t) || p(. | control prefix, y<t)),
  its codec noise floor, settle step, area, half-life and Δ log p.  This is the attractor
  measurement.
- Trajectory divergence, labelled as such: KL(perturbed_j,t || control_j,t) between matched
  trajectories at step t, whose contexts differ once their sampled tokens do (after the first
  few steps it measures sampling divergence, not the edit), with the same KL between two
  control trajectories (j, j+1) as its floor.
- Recovery time of a perturbed trajectory: the first step t after which the rolling means
  (window w) of its sampled-token probability and of its entropy both stay inside the
  controls' [5th, 95th] percentile band of the same rolling means.  Trajectories that never
  settle are censored (NaN) and counted.  This is a definition of ours: the paper shows the
  effect (red, then green) without measuring it.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib.common import mean_std, save_figure, write_csv
from analyses.lib.influence import influence, vs_reference
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.errors import EngineError
from engine.stream import map_rows


def rolling(x: np.ndarray, w: int) -> np.ndarray:
    """Trailing rolling mean (the first w-1 entries average what exists so far)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    return (c[idx] - c[np.maximum(idx - w, 0)]) / np.minimum(idx, w)


def recovery_time(p, h, band_p, band_h, w: int) -> float:
    rp, rh = rolling(p, w), rolling(h, w)
    inside = (rp >= band_p[0]) & (rp <= band_p[1]) & (rh >= band_h[0]) & (rh <= band_h[1])
    if not inside.size or not inside[-1]:
        return float("nan")
    outside = np.flatnonzero(~inside)
    return float(outside[-1] + 1 if outside.size else 0)


def trajectories(a: Archive, progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sample: (sampled-token probability [L], entropy [L]), streamed chunk by chunk."""

    def stats(rows, tokens):
        return {"p": np.exp(K.token_stats(rows, tokens).logprob), "h": K.entropy(rows)}

    r, sample, _ = map_rows(a, stats, with_tokens=True, progress=progress, desc="trajectories")
    cuts = np.cumsum(np.bincount(sample, minlength=a.n_complete))[:-1]  # rows are sample-major
    empty = np.empty(0)
    return list(zip(np.split(r.get("p", empty), cuts), np.split(r.get("h", empty), cuts)))


def kl_between(a: Archive, i: int, j: int) -> np.ndarray:
    """KL(sample i's step-t distribution || sample j's), for the steps both have; only these
    two samples' rows are read (memory: two trajectories, not the archive)."""
    s = a.samples()["length"]
    n = int(min(s[i], s[j]))
    if n == 0:
        return np.empty(0)
    m = a.model()
    return K.pair_stats(m.rows(i, slice(0, n)), m.rows(j, slice(0, n))).kl_pq


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    lin = a.lineage()
    if lin is None:
        raise EngineError(
            "attractor needs an archive from `python -m engine perturb` (no /lineage)"
        )
    variant, control = np.array(lin["variant"]), lin["control_prompt"]
    M = a.samples_per_prompt
    traj = trajectories(a, cfg.progress)
    results, curves, base_curves, table = (
        [],
        {},
        {},
        {
            k: []
            for k in (
                "prompt",
                "sample",
                "control_sample",
                "step",
                "kl_to_control",
                "p_sampled",
                "entropy",
            )
        },
    )
    for v in np.flatnonzero(variant != "control"):
        cp = int(control[v])
        ctrl = [traj[cp * M + j] for j in range(M)]
        band_p = np.percentile(
            np.concatenate([rolling(t[0], c.window) for t in ctrl]), list(c.band)
        )
        band_h = np.percentile(
            np.concatenate([rolling(t[1], c.window) for t in ctrl]), list(c.band)
        )
        kl_by_t, base_by_t, rec = {}, {}, []
        for j in range(M):
            pv = traj[int(v) * M + j]
            kl = kl_between(a, int(v) * M + j, cp * M + j)
            for t in range(len(kl)):
                kl_by_t.setdefault(t, []).append(float(kl[t]))
                for k, val in zip(
                    table, (int(v), int(v) * M + j, cp * M + j, t, kl[t], pv[0][t], pv[1][t])
                ):
                    table[k].append(val)
            if M > 1:
                for t, val in enumerate(kl_between(a, cp * M + j, cp * M + (j + 1) % M)):
                    base_by_t.setdefault(t, []).append(float(val))
            rec.append(recovery_time(pv[0], pv[1], band_p, band_h, int(c.window)))
        rec = np.array(rec)
        name = f"prompt {int(v)} ({variant[v]}: {lin['edit'][v]})"
        curves[name] = {t: float(np.mean(x)) for t, x in sorted(kl_by_t.items())}
        base_curves[name] = {t: float(np.mean(x)) for t, x in sorted(base_by_t.items())}
        results.append(
            {
                "prompt": int(v),
                "control_prompt": cp,
                "variant": str(variant[v]),
                "edit": lin["edit"][v],
                "parent_sample": int(lin["parent_sample"][v]),
                "recovery_time": {
                    **mean_std(rec[np.isfinite(rec)]),
                    "median": float(np.median(rec[np.isfinite(rec)]))
                    if np.isfinite(rec).any()
                    else float("nan"),
                    "recovered": int(np.isfinite(rec).sum()),
                    "censored": int((~np.isfinite(rec)).sum()),
                    "values": rec.tolist(),
                },
                "band": {"p_sampled": band_p.tolist(), "entropy": band_h.tolist()},
                "kl_first_step": curves[name].get(0, float("nan")),
                "kl_control_baseline_mean": float(
                    np.mean([x for xs in base_by_t.values() for x in xs])
                )
                if base_by_t
                else float("nan"),
            }
        )
    write_csv(out, "per_step.csv", table)
    infl = influence(a, lin, float(c.threshold_floors), int(c.n_boot), int(c.seed))
    compared = None
    if c.get("reference"):
        compared = against_reference(infl, str(c.reference), c)
    figures = (influence_figure(infl, out) if infl else []) + kl_figure(curves, base_curves, out)
    figures += recovery_figure(results, out)
    figures += heatmap(a, traj, variant, M, out) + [
        render_html(a, traj, variant, M, int(c.render_limit), out)
    ]
    return {
        "model": a.generator,
        "window": int(c.window),
        "band_percentiles": list(c.band),
        "influence": infl,
        "influence_note": None
        if infl
        else (
            "no counterpart group: `python -m engine score archive=... counterpart=true` "
            "stores what the influence curves need"
        ),
        "variants": results,
        **({"vs_reference": compared} if compared is not None else {}),
        "trajectory_divergence_by_step": curves,
        "trajectory_divergence_control_vs_control_by_step": base_curves,
        "figures": figures,
    }


def against_reference(infl: dict | None, path: str, c) -> dict:
    """This model's influence of the edit against another model's, each on its own
    continuations of the same edit (`influence.vs_reference`: the area under I(t))."""
    if infl is None:
        raise EngineError(
            "analysis.reference needs this archive's counterpart group: `python -m engine "
            "score archive=... counterpart=true`"
        )
    with Archive(path) as b:
        lin = b.lineage()
        if lin is None:
            raise EngineError(f"analysis.reference={path} is not a perturbation archive")
        ref = influence(b, lin, float(c.threshold_floors), int(c.n_boot), int(c.seed))
        model = b.generator
    if ref is None:
        raise EngineError(
            f"analysis.reference={path} has no counterpart group: `python -m engine score "
            f"archive={path} counterpart=true`"
        )
    variants = vs_reference(infl, ref, int(c.n_boot), int(c.seed))
    if not variants:
        raise EngineError(f"analysis.reference={path} shares no perturbed variant with this one")
    return {"archive": path, "model": model, "variants": variants}


def kl_figure(curves, base_curves, out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, cv in curves.items():
        (line,) = ax.plot(list(cv), list(cv.values()), marker=".", label=name[:60])
        bc = base_curves.get(name, {})
        if bc:
            ax.plot(
                list(bc), list(bc.values()), ls=":", c=line.get_color(), label="control vs control"
            )
    ax.set_xlabel("steps since the edit")
    ax.set_ylabel("mean KL(perturbed ‖ matched control) (nats)")
    ax.set_title(
        "Trajectory divergence (different contexts after the first tokens;\n"
        "not the edit's influence: see influence.png)",
        fontsize=9,
    )
    ax.legend(fontsize=6)
    return save_figure(fig, out, "trajectory_divergence")


def influence_figure(infl: dict, out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, v in infl["variants"].items():
        y = np.maximum(np.array(v["kl_by_step"]), 1e-16)
        band = np.maximum(np.array(v["kl_band95_by_step"]), 1e-16)
        t = np.arange(len(y))
        (line,) = ax.plot(
            t, y, marker=".", label=f"{name[:60]} (half-life {v['half_life_steps']:.3g})"
        )
        ax.fill_between(t, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2)
    ax.axhline(infl["noise_floor"], c="grey", ls=":", label="codec noise floor")
    ax.axhline(infl["threshold"], c="k", ls="--", lw=0.8, label="settle threshold")
    ax.set_yscale("log")
    ax.set_xlabel("steps since the edit (same continuation tokens under both prefixes)")
    ax.set_ylabel("I(t) = KL(edited ‖ control) (nats)")
    ax.set_title(
        "The edit's influence on identical continuations (mean, 95% bootstrap band)", fontsize=9
    )
    ax.legend(fontsize=6)
    return save_figure(fig, out, "influence")


def recovery_figure(results, out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        vals = np.array(r["recovery_time"]["values"])
        ax.hist(
            vals[np.isfinite(vals)],
            bins=20,
            alpha=0.6,
            label=f"prompt {r['prompt']} ({r['recovery_time']['censored']} censored)",
        )
    ax.set_xlabel("recovery time (steps since the edit)")
    ax.set_ylabel("trajectories")
    ax.legend(fontsize=7)
    ax.set_title("Recovery time distribution")
    return save_figure(fig, out, "recovery_time")


def heatmap(a, traj, variant, M, out: Path) -> list[str]:
    T = a.max_new_tokens
    rows, labels = [], []
    for pidx in range(len(variant)):
        for j in range(M):
            p = traj[pidx * M + j][0]
            rows.append(np.pad(p, (0, T - len(p)), constant_values=np.nan))
            labels.append(f"{'ctrl' if variant[pidx] == 'control' else 'pert'} p{pidx} #{j}")
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * T), max(3, 0.18 * len(rows))))
    im = ax.imshow(
        np.array(rows), aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_xlabel("steps since the edit")
    fig.colorbar(im, ax=ax, label="probability of the sampled token")
    ax.set_title("Sampled-token probability: controls and perturbed continuations")
    return save_figure(fig, out, "probability_heatmap")


def render_html(a, traj, variant, M, limit, out: Path) -> str:
    s = a.samples()
    vocab = a.model().vocab()
    prompts = a.model().prompt_text
    parts = [
        "<html><meta charset='utf-8'><body style='font-family:monospace'>",
        "<p>Probability of each sampled token: red = low, green = high.</p>",
    ]
    for pidx in range(len(variant)):
        kind = "control" if variant[pidx] == "control" else "perturbed"
        parts.append(f"<h3>prompt {pidx} ({kind})</h3><pre>{html.escape(prompts[pidx])}</pre>")
        for j in range(min(M, limit)):
            i = pidx * M + j
            spans = []
            for t, pr in zip(s["tokens"][i, : int(s["length"][i])], traj[i][0]):
                r, g = int(255 * (1 - pr)), int(200 * pr + 55 * (1 - pr))
                spans.append(
                    f"<span style='background:rgb({r},{g},60)' title='p={pr:.3f}'>{html.escape(vocab[t])}</span>"
                )
            parts.append(f"<p>#{j}: {''.join(spans)}</p>")
    parts.append("</body></html>")
    path = out / "rendering.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return str(path)


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    out = []
    for v in s.get("variants", []):
        rt = v.get("recovery_time", {})
        out.append(
            f"prompt {v.get('prompt')} ({v.get('edit')}): KL at the first step "
            f"{v.get('kl_first_step', float('nan')):.3f} nats, recovered "
            f"{rt.get('recovered')}/{(rt.get('recovered') or 0) + (rt.get('censored') or 0)}, "
            f"median recovery {rt.get('median')} steps"
        )
    return out


ANALYSIS = Analysis(name="attractor", run=run, terminal_lines=terminal_lines)
