"""Entropy analysis (Exp 3 of Mohammadi 2024, "Creativity Has Left the Chat").

Per generated step: full-vocabulary Shannon entropy (nats) and the paper's top-5 entropy
(bits; the five most probable tokens renormalised, so at most log2 5 = 2.32).  Per completion:
the mean over its steps.  Per model: mean and std over completions.  Every model group of the
archive is analysed on the same stored contexts (a scored model's rows are its distributions on
the generator's completions).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib.common import finite_rows, mean_std, save_figure, write_csv
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.stream import map_rows


def per_step(a: Archive, key: str, topk: int, progress: bool):
    """Full entropy (nats) and top-k entropy (bits) of every stored row: one read of the archive."""

    def both(x):
        return {"full": K.entropy(x), "top": K.entropy(x, base=2, topk=topk)}

    r, sample, step = map_rows(a, both, key, progress=progress, desc=f"entropy {key}")
    r, sample, step, skipped = finite_rows(r, sample, step, "full")
    return r["full"], r["top"], sample, step, skipped


def per_completion(values, sample, n):
    sums = np.bincount(sample, values, minlength=n)
    counts = np.bincount(sample, minlength=n)
    keep = counts > 0
    return sums[keep] / counts[keep], np.flatnonzero(keep)


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    s = a.samples()
    n = a.n_complete
    summary, figures, curves, comp_top = {"models": {}}, [], {}, {}
    rows_table = {
        k: [] for k in ("model", "sample", "prompt", "step", "entropy_nats", "top5_entropy_bits")
    }
    for key in a.models:
        full, top, sample, step, skipped = per_step(a, key, c.topk, cfg.progress)
        top_c, done = per_completion(top, sample, n)
        full_c, _ = per_completion(full, sample, n)
        comp_top[key] = top_c
        per_prompt = {}
        for p, text in enumerate(a.prompts):
            sel = s["prompt_index"][done] == p
            per_prompt[text] = {
                "top5_entropy_bits": {**mean_std(top_c[sel]), "n_completions": int(sel.sum())},
                "entropy_nats": mean_std(full_c[sel]),
            }
        summary["models"][key] = {
            "top5_entropy_bits": {**mean_std(top_c), "n_completions": int(len(top_c))},
            "entropy_nats": mean_std(full_c),
            "branching_factor": mean_std(np.exp(full)),
            "n_steps": int(len(full)),
            "skipped_nonfinite_rows": skipped,
            "per_prompt": per_prompt,
        }
        rows_table["model"] += [key] * len(full)
        rows_table["sample"] += sample.tolist()
        rows_table["prompt"] += s["prompt_index"][sample].tolist()
        rows_table["step"] += step.tolist()
        rows_table["entropy_nats"] += full.tolist()
        rows_table["top5_entropy_bits"] += top.tolist()
        curves[key] = entropy_curve(a, key, list(c.gammas), c.gamma_rows)
    write_csv(out, "per_step.csv", rows_table)
    summary["entropy_vs_gamma"] = {k: dict(zip(map(str, c.gammas), v)) for k, v in curves.items()}
    summary["topk"] = int(c.topk)
    figures += boxplot(comp_top, out)
    figures += token_figures(a, c, out)
    figures += curve_figure(curves, list(c.gammas), out)
    summary["figures"] = figures
    return summary


def entropy_curve(a: Archive, key: str, gammas, max_rows: int) -> list[float]:
    """Mean entropy of p**g over up to max_rows stored rows spread over the samples."""
    m = a.model(key)
    lengths = a.samples()["length"][: min(a.n_complete, m.n_complete)]
    picks = [(i, t) for i in range(len(lengths)) for t in range(int(lengths[i]))]
    if not picks:
        return [float("nan")] * len(gammas)
    idx = np.linspace(0, len(picks) - 1, min(max_rows, len(picks))).astype(int)
    h = [
        K.tempered_entropy(np.stack([m.rows(*picks[j]) for j in part]), gammas)
        for part in np.array_split(idx, -(-len(idx) // 64))
    ]  # 64 rows in memory at a time
    return np.concatenate(h).mean(0).tolist()


def boxplot(comp_top: dict, out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(max(4, 2 + 1.6 * len(comp_top)), 4))
    ax.boxplot(list(comp_top.values()), showmeans=True)
    ax.set_xticks(range(1, len(comp_top) + 1), list(comp_top), rotation=15, ha="right")
    ax.set_ylabel("mean top-5 entropy per completion (bits)")
    ax.axhline(np.log2(5), ls=":", c="grey", lw=1)
    ax.set_title("Top-5 next-token entropy by model")
    return save_figure(fig, out, "top5_entropy_boxplot")


def token_figures(a: Archive, c, out: Path) -> list[str]:
    """Per-token top-5 entropy bars and stacked top-5 probabilities for one completion."""
    i = int(c.sample)
    if not 0 <= i < a.n_complete:
        return []
    s = a.samples()
    n = int(s["length"][i])
    m = a.model()
    vocab = m.vocab()
    rows = m.rows(i, slice(0, n))  # [step, vocab]
    top = np.sort(np.exp(K.log_softmax(rows)), 1)[:, ::-1][:, : c.topk]
    top = top / top.sum(1, keepdims=True)
    h = K.entropy(rows, base=2, topk=int(c.topk))
    # control characters have no glyph in the figure's font: show them escaped (\x04)
    labels = [
        vocab[t] if vocab[t].isprintable() else repr(vocab[t])[1:-1] for t in s["tokens"][i, :n]
    ]
    figs = []
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n), 3.5))
    ax.bar(range(n), h, color="tab:blue")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_ylabel("top-5 entropy (bits)")
    ax.set_title(f"Per-token top-5 entropy, sample {i} ({m.key})")
    figs += save_figure(fig, out, "per_token_top5_entropy")
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n), 3.5))
    bottom = np.zeros(n)
    for r in range(top.shape[1]):
        ax.bar(range(n), top[:, r], bottom=bottom, label=f"rank {r + 1}")
        bottom += top[:, r]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_ylabel("renormalised top-5 probability")
    ax.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.set_title(f"Top-5 next-token probabilities, sample {i} ({m.key})", pad=28)
    figs += save_figure(fig, out, "per_token_top5_probabilities")
    return figs


def curve_figure(curves: dict, gammas, out: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, v in curves.items():
        ax.plot(gammas, v, marker="o", label=key)
    ax.set_xlabel("power γ (inverse temperature 1/T)")
    ax.set_ylabel("mean entropy of p^γ (nats)")
    ax.set_title("Entropy against tempering")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "entropy_vs_gamma")


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    return [
        f"{k}: entropy {m['entropy_nats']['mean']:.3f} nats, top-5 entropy "
        f"{m['top5_entropy_bits']['mean']:.3f} bits ({m['top5_entropy_bits']['n_completions']} "
        f"completions)"
        for k, m in s["models"].items()
    ]


ANALYSIS = Analysis(name="entropy", run=run, terminal_lines=terminal_lines)
