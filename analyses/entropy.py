"""Entropy analysis (Exp 3 of Mohammadi 2024, "Creativity Has Left the Chat").

Per generated step: full-vocabulary Shannon entropy (nats) and the paper's top-5 entropy
(bits; the five most probable tokens renormalised, so at most log2 5 = 2.32).  Per completion:
the mean over its steps.  Per model: mean and std over completions.  Every model group of the
archive is analysed on the same stored contexts (a scored model's rows are its distributions on
the generator's completions).

Two branching factors, which are different quantities:
- the engine's per-step exp(H) (`kernels.branching_factor`: full vocabulary, one step):
  `branching_factor` (over all steps) and `branching_factor_by_position` (the mean over
  completions at each generated step);
- `branching_factor_yang_holtzman`: the number Yang, Li & Holtzman report, computed as their
  published code does (`analyses.lib.branching`: top-p-truncated entropies pooled per position
  over a prompt's samples, or the mean NLL past 50 positions; exp per prompt, mean over
  prompts).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

import kernels as K
from analyses.lib import branching as B
from analyses.lib.common import (
    finite_rows,
    mean_std,
    paired_over_prompts,
    position_bands,
    save_figure,
    write_csv,
)
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.archive.codecs import decode
from engine.errors import EngineError
from engine.stream import map_rows

#: how the summary tells the two branching factors apart
BF_NOTE = (
    "branching_factor and branching_factor_by_position: the engine's per-step exp(H) "
    "(full-vocabulary entropy of one next-token distribution, nats). "
    "branching_factor_yang_holtzman: Yang, Li & Holtzman's BF as their code "
    "(github.com/yangalan123/LLMBranchingFactor) computes it: per prompt, the mean over "
    "positions of the per-position mean (over samples) entropy of the top-p-truncated, "
    "renormalised top-K distribution, or past asymptotic_limit positions the mean NLL of the "
    "sampled tokens under it; exp per prompt, then the mean over prompts (value). "
    "A different quantity: not comparable to exp(H) per step."
)


def decoded(x):
    """A block as `map_rows` hands it (float array, or `K.Encoded` bf16/q16) as float32 rows."""
    if isinstance(x, K.Encoded):
        return decode(x.codec, x.data, x.scale, x.offset)
    return np.asarray(x, np.float32)


def per_step(a: Archive, key: str, topk: int, progress: bool, yh: B.Settings):
    """Full entropy (nats), top-k entropy (bits) and Yang & Holtzman's per-token terms
    (`branching.token_terms`) of every stored row: one read of the archive.

    Returns (full, top, sample, step, skipped) over the rows with finite logits, and the
    per-row Yang-Holtzman record (`h`, `lp`, `sample`, `step`, `stop`: the row's logits were
    not finite) over every stored row."""

    def terms(x, tokens):
        h, lp = B.token_terms(decoded(x), tokens, yh)
        return {
            "full": K.entropy(x),
            "top": K.entropy(x, base=2, topk=topk),
            "yh_h": h,
            "yh_lp": lp,
        }

    r, sample, step = map_rows(
        a, terms, key, with_tokens=True, progress=progress, desc=f"entropy {key}"
    )
    stop = np.isnan(np.asarray(r.get("full", np.empty(0)), np.float64))
    rec = {"h": r.get("yh_h"), "lp": r.get("yh_lp"), "sample": sample, "step": step, "stop": stop}
    r, sample, step, skipped = finite_rows(r, sample, step, "full")
    return r["full"], r["top"], sample, step, skipped, rec


def sampling_settings(a: Archive) -> dict:
    """temperature, top_k and top_p the archive's completions were drawn with (its run key);
    the engine's defaults (1, 0 = off, 1 = off) where the run key has none."""
    rk = a.run_key
    return {
        "temperature": float(rk.get("temperature", 1.0)),
        "top_k": int(rk.get("top_k", 0)),
        "top_p": float(rk.get("top_p", 1.0)),
        "from_run_key": all(k in rk for k in ("temperature", "top_k", "top_p")),
    }


def per_completion(values, sample, n):
    sums = np.bincount(sample, values, minlength=n)
    counts = np.bincount(sample, minlength=n)
    keep = counts > 0
    return sums[keep] / counts[keep], np.flatnonzero(keep)


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    s = a.samples()
    n = a.n_complete
    summary, figures, curves, comp_top, bf_curves = {"models": {}}, [], {}, {}, {}
    by_completion: dict = {}  # model -> measure -> {completion: its mean}
    rows_table = {
        k: [] for k in ("model", "sample", "prompt", "step", "entropy_nats", "top5_entropy_bits")
    }
    sampling = sampling_settings(a)
    yh = B.Settings.from_config(c.yang_holtzman, sampling)
    limit = B.check_limit(c.yang_holtzman.asymptotic_limit)
    for key in a.models:
        full, top, sample, step, skipped, rec = per_step(a, key, c.topk, cfg.progress, yh)
        top_c, done = per_completion(top, sample, n)
        full_c, _ = per_completion(full, sample, n)
        comp_top[key] = top_c
        by_completion[key] = {
            "entropy_nats": dict(zip(done, full_c)),
            "top5_entropy_bits": dict(zip(done, top_c)),
        }
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
            "branching_factor_by_position": position_bands(
                np.exp(full), sample, step, int(c.n_boot), int(c.seed)
            ),
            "branching_factor_yang_holtzman": yang_holtzman(a, key, rec, yh, limit, sampling),
            "n_steps": int(len(full)),
            "skipped_nonfinite_rows": skipped,
            "per_prompt": per_prompt,
        }
        bf_curves[key] = summary["models"][key]["branching_factor_by_position"]
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
    summary["branching_factor_note"] = BF_NOTE
    figures += boxplot(comp_top, out)
    figures += token_figures(a, c, out)
    figures += curve_figure(curves, list(c.gammas), out)
    figures += bf_position_figure(bf_curves, out)
    summary["paired_vs_generator"] = paired(by_completion, a.generator, int(c.n_boot), int(c.seed))
    if c.get("reference"):
        summary["vs_reference"] = vs_reference(
            summary["models"][a.generator], str(c.reference), c, cfg.progress
        )
    summary["figures"] = figures
    return summary


def own_per_prompt(m: dict) -> dict:
    """prompt -> score, for each per-prompt score of a model's summary on its own samples:
    its mean full entropy per step (mean over the prompt's completions) and Yang & Holtzman's
    branching factor (undefined prompts: None)."""
    yh = m["branching_factor_yang_holtzman"]["per_prompt"]
    return {
        "entropy_nats": {p: v["entropy_nats"]["mean"] for p, v in m["per_prompt"].items()},
        "branching_factor_yang_holtzman": {p: v.get("bf") for p, v in yh.items()},
    }


def vs_reference(this: dict, path: str, c, progress: bool) -> dict:
    """This archive's generator against another archive's generator on the same prompts, each
    on its own completions (the base model's own samples, say): per score of
    `own_per_prompt`, the difference of the means over prompts with a 95% bootstrap interval
    over prompts, paired by prompt (`paired_over_prompts`).  Where the models share tokens
    instead, `paired_vs_generator` is the finer comparison."""
    with Archive(path) as b:
        key = b.generator
        sampling = sampling_settings(b)
        yh = B.Settings.from_config(c.yang_holtzman, sampling)
        limit = B.check_limit(c.yang_holtzman.asymptotic_limit)
        full, _, sample, _, _, rec = per_step(b, key, c.topk, progress, yh)
        full_c, done = per_completion(full, sample, b.n_complete)
        prompt = b.samples()["prompt_index"][done]
        ref = {
            "entropy_nats": {
                t: float(full_c[prompt == p].mean()) if (prompt == p).any() else None
                for p, t in enumerate(b.prompts)
            },
            "branching_factor_yang_holtzman": {
                p: v.get("bf")
                for p, v in yang_holtzman(b, key, rec, yh, limit, sampling)["per_prompt"].items()
            },
        }
    mine = own_per_prompt(this)
    if not any(p in ref["entropy_nats"] for p in mine["entropy_nats"]):
        raise EngineError(f"analysis.reference={path} shares no prompt with this archive")
    out = {"archive": path, "model": key}
    for k, v in mine.items():
        out[k] = paired_over_prompts(v, ref[k], int(c.n_boot), int(c.seed))
    return out


def paired(by_completion: dict, generator: str, n_boot: int, seed: int) -> dict:
    """Every other model against the generator on the generator's own completions (identical
    tokens): per measure, the mean over completions of (model − generator) of the completion's
    mean, with a 95% percentile bootstrap interval over completions (`kernels.bootstrap_ci`)."""
    out = {}
    for key, measures in by_completion.items():
        if key == generator or generator not in by_completion:
            continue
        out[key] = {}
        for name, mine in measures.items():
            theirs = by_completion[generator][name]
            common = sorted(set(mine) & set(theirs))
            d = np.array([mine[i] - theirs[i] for i in common], np.float64)
            out[key][name] = {
                "mean_diff": float(d.mean()) if len(d) else None,
                "ci95": list(K.bootstrap_ci(d, n_boot=n_boot, seed=seed)) if len(d) > 1 else None,
                "n_completions": len(d),
            }
    return out


def yang_holtzman(a: Archive, key: str, rec: dict, yh: B.Settings, limit: int, sampling) -> dict:
    """`branching.yang_holtzman` over the model's complete samples, with the settings used."""
    n = min(a.n_complete, a.model(key).n_complete)
    prompt_of_sample = a.samples()["prompt_index"][:n]
    out = B.yang_holtzman(
        rec["h"] if rec["h"] is not None else np.empty(0),
        rec["lp"] if rec["lp"] is not None else np.empty(0),
        rec["sample"],
        rec["step"],
        rec["stop"],
        prompt_of_sample,
        a.prompts,
        limit,
    )
    out["settings"] = {
        "asymptotic_limit": limit,
        "top_p": yh.top_p,
        "logprobs": yh.logprobs,
        "distribution_warp": {
            "temperature": yh.temperature,
            "top_k": yh.top_k,
            "top_p": yh.sampling_top_p,
        },
        "archive_sampling": sampling,
    }
    out["on_own_samples"] = key == a.generator
    return out


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


def bf_position_figure(curves: dict, out: Path) -> list[str]:
    """The engine's per-step branching factor exp(H) by generated step, one line per model,
    on a log axis (alignment is expected to shift it by a factor, not by an amount)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, c in curves.items():
        ax.plot(range(len(c["mean"])), c["mean"], marker=".", label=key)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generated step (0 = first token after the prompt)")
    ax.set_ylabel(
        "mean exp(H) over completions\n(effective next-token choices;\nH: full-vocabulary entropy, nats)"
    )
    ax.set_title("Per-step branching factor exp(H) by position")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "branching_factor_by_position")


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    lines = []
    for k, m in s["models"].items():
        lines.append(
            f"{k}: entropy {m['entropy_nats']['mean']:.3f} nats, top-5 entropy "
            f"{m['top5_entropy_bits']['mean']:.3f} bits ({m['top5_entropy_bits']['n_completions']} "
            f"completions)"
        )
        yh = m.get("branching_factor_yang_holtzman")
        if yh is None:
            continue
        their = (
            f"{yh['value']:.2f} (mean over {yh['n_prompts']} prompts)"
            if yh["n_prompts"]
            else f"undefined (it needs {B.MIN_SAMPLES}+ completions of a prompt)"
        )
        lines.append(
            f"{k}: branching factor, Yang & Holtzman's definition: {their}; "
            f"the engine's mean per-step exp(H): {m['branching_factor']['mean']:.2f}"
        )
    return lines


ANALYSIS = Analysis(name="entropy", run=run, terminal_lines=terminal_lines)
