"""Diversity of the generated completions (Exp 2 of Mohammadi 2024; Kirk et al. 2024).

Texts are the generator's completions decoded with the archive's own tokenizer.  Two n-gram
definitions, named for what they are (they differ by ~0.03 on the demo's completions, more
than many effects one would compare):
- `*_tokens`: n-grams over the model's token ids, V = the model's vocabulary size;
- `*_words_kirk`: Kirk et al.'s released code (facebookresearch/rlfh-gen-div,
  diversity/utils.py `lines_to_ngrams`, diversity_metrics.py): whitespace words after deleting
  "." and newlines, V = 50257, averaged over n = 1..5, and 0.0 where there is no n-gram;
  these are the numbers comparable with that paper.
- distinct-n = unique n-grams / total n-grams;
- EAD (expectation-adjusted distinct, Liu et al. 2022, as in Kirk et al.) =
  unique / (V (1 - ((V - 1) / V)**C)), C = total n-grams;
- TF-IDF cosine similarity: mean ± std over pairs i < j of completions (Mohammadi 2024's
  definition; higher = less diverse);
- Sentence-BERT diversity = 1 - mean cosine over pairs i < j (Kirk et al.'s reduction of a
  similarity to a diversity), with all-MiniLM-L6-v2 embeddings;
- `*_shaib`: the `diversity` package's scores (Shaib et al. 2024; analyses/lib/textdiv.py,
  its code's definitions): compression ratio (gzip and xz), n-gram diversity score
  (n = 1..4), self-repetition score, homogenization score (ROUGE-L);
- Self-BLEU (`self_bleu_texygen`, Zhu et al. 2018's Texygen definition, nltk smoothing
  method1, whitespace tokens);
- t-SNE map of the embeddings coloured by k-means cluster, k chosen by silhouette.
Per-input: over the completions of each prompt, averaged over prompts; cross-input: over the
first completion of each prompt.  Intervals: the mean over prompts with a bootstrap over
prompts; the cross-input scores over random picks of one completion per prompt.  Compare
models by running it on each model's archive.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import kernels as K
from analyses.lib import textdiv
from analyses.lib.clusters import kmeans_by_silhouette, tsne_xy
from analyses.lib.common import mean_std, paired_over_prompts, save_figure, write_csv
from analyses.lib.embeddings import embed
from analyses.lib.textdiv import ngrams
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.errors import EngineError


def distinct_and_ead(seqs, n: int, V: int) -> tuple[float, float]:
    grams = [g for s in seqs for g in ngrams(list(s), n)]
    C, unique = len(grams), len(set(grams))
    if C == 0:
        return float("nan"), float("nan")
    expected = V * (1 - ((V - 1) / V) ** C)
    return unique / C, unique / expected


KIRK_V = 50257  # Kirk et al.'s vocabulary size for word-level EAD (GPT-2's, whatever the model)


def kirk_words(text: str) -> list[str]:
    """Kirk et al.'s words: '.' and newlines deleted (not replaced), split on single spaces."""
    return [w for w in text.replace(".", "").replace("\n", "").split(" ") if w != ""]


def kirk_word_metrics(texts, n_max: int = 5) -> tuple[float, float]:
    """(distinct, EAD) over whitespace words, averaged over n = 1..n_max, as Kirk et al.'s
    AveragedDistinctNgrams and AveragedExpectationAdjustedDistinctNgrams (0.0 for no n-gram)."""
    words = [kirk_words(t) for t in texts]
    dist, ead = [], []
    for n in range(1, n_max + 1):
        grams = [g for w in words for g in ngrams(w, n)]
        C, unique = len(grams), len(set(grams))
        dist.append(unique / C if C else 0.0)
        denom = KIRK_V * (1 - ((KIRK_V - 1) / KIRK_V) ** C)
        ead.append(unique / denom if denom else 0.0)
    return float(np.mean(dist)), float(np.mean(ead))


def pairwise_cos(vecs) -> np.ndarray:
    """Cosine similarities of all unordered pairs of rows."""
    v = np.asarray(vecs, np.float64)
    norms = np.linalg.norm(v, axis=1)
    v = v / np.where(norms > 0, norms, 1)[:, None]
    sims = v @ v.T
    i, j = np.triu_indices(len(v), 1)
    return sims[i, j]


def tfidf(texts):
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        # every word counts, one-letter ones too (sklearn drops them by default)
        return TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit_transform(texts).toarray()
    except ValueError:  # no word in any text (e.g. only punctuation)
        return np.zeros((len(texts), 1))


def metrics(texts, seqs, emb, V, max_n) -> dict:
    dist = {n: distinct_and_ead(seqs, n, V) for n in range(1, max_n + 1)}
    tf = pairwise_cos(tfidf(texts)) if len(texts) > 1 else np.array([])
    sb = pairwise_cos(emb) if len(texts) > 1 else np.array([])
    d_words, ead_words = kirk_word_metrics(texts)
    return {
        "distinct_tokens": {str(n): d for n, (d, _) in dist.items()},
        "ead_tokens": {str(n): e for n, (_, e) in dist.items()},
        "ead_tokens_mean": float(np.nanmean([e for _, e in dist.values()])),
        "distinct_words_kirk": d_words,
        "ead_words_kirk": ead_words,
        "tfidf_cosine": mean_std(tf),
        "sentbert_diversity": float(1 - sb.mean()) if sb.size else float("nan"),
        **shaib_scores(texts),
        "homogenization_rougel_shaib": textdiv.homogenization_rougel(texts),
        "self_bleu_texygen": textdiv.self_bleu(texts),
        "n_texts": len(texts),
    }


SHAIB_KEYS = (
    "compression_ratio_gzip_shaib",
    "compression_ratio_xz_shaib",
    "ngram_diversity_shaib",
    "self_repetition_shaib",
)


#: the per-text-set scores that get a mean over prompts and an interval
SCALAR_KEYS = (
    "ead_tokens_mean",
    "ead_words_kirk",
    "distinct_words_kirk",
    "sentbert_diversity",
    "tfidf_cosine_mean",
    *SHAIB_KEYS,
    "homogenization_rougel_shaib",
    "self_bleu_texygen",
)


def bootstrap_over_prompts(values, n_boot: int, seed: int) -> dict:
    """95% percentile interval of the mean over prompts, prompts resampled (the prompt is the
    unit: each one's score is computed on its own K completions, never on duplicates)."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return {"ci95": [float("nan"), float("nan")], "n_prompts": int(x.size)}
    lo, hi = K.bootstrap_ci(x, np.mean, n_boot=n_boot, seed=seed)
    return {"ci95": [lo, hi], "n_prompts": int(x.size)}


def cross_input_draws(texts, seqs, emb, prompt, n_prompts, V, max_n, n_draws, seed):
    """The cross-input scores over `n_draws` random picks of one completion per prompt (the
    reported cross-input set is the first completion of each): their median and 2.5-97.5%
    range, how much the number depends on which completion stands for each prompt.  Not a
    bootstrap with replacement: a set-level diversity score of a resample holding duplicates
    is biased towards sameness."""
    groups = [np.flatnonzero(prompt == p) for p in range(n_prompts)]
    groups = [g for g in groups if g.size]
    if len(groups) < 2 or n_draws < 1 or all(g.size == 1 for g in groups):
        return {"n_draws": 0}
    rng = np.random.default_rng(seed)
    got = []
    for _ in range(n_draws):
        pick = [int(rng.choice(g)) for g in groups]
        got.append(
            scalar(metrics([texts[i] for i in pick], [seqs[i] for i in pick], emb[pick], V, max_n))
        )
    out = {"n_draws": n_draws, "n_prompts": len(groups)}
    for k in SCALAR_KEYS:
        x = np.array([g[k] for g in got], np.float64)
        x = x[np.isfinite(x)]
        out[k] = (
            {
                "median": float(np.median(x)),
                "range95": [float(np.quantile(x, 0.025)), float(np.quantile(x, 0.975))],
            }
            if x.size
            else {"median": float("nan"), "range95": [float("nan"), float("nan")]}
        )
    return out


def shaib_scores(texts) -> dict:
    """The `diversity` package's scores of these texts (NaN where it has none: no text, or
    fewer than 4 words for the n-gram diversity score, where the package divides by zero)."""
    if not texts or not any(t.strip() for t in texts):
        return dict.fromkeys(SHAIB_KEYS, float("nan"))
    try:
        ngram = textdiv.ngram_diversity_score(texts)
    except ValueError:
        ngram = float("nan")
    return {
        "compression_ratio_gzip_shaib": textdiv.compression_ratio(texts, "gzip"),
        "compression_ratio_xz_shaib": textdiv.compression_ratio(texts, "xz"),
        "ngram_diversity_shaib": ngram,
        "self_repetition_shaib": textdiv.self_repetition_score(texts),
    }


def completions(a: Archive):
    """(token sequences, texts, prompt index) of the archive's complete samples."""
    s = a.samples()
    text = a.model().text
    seqs = [s["tokens"][i, : int(s["length"][i])] for i in range(a.n_complete)]
    return seqs, [text(q) for q in seqs], s["prompt_index"][: a.n_complete]


def per_input_metrics(a: Archive, seqs, texts, prompt, emb, max_n) -> dict:
    """{prompt text: metrics over that prompt's completions}."""
    V = a.model().vocab_size
    out = {}
    for p, ptext in enumerate(a.prompts):
        idx = np.flatnonzero(prompt == p)
        if idx.size:
            out[ptext] = metrics(
                [texts[i] for i in idx], [seqs[i] for i in idx], emb[idx], V, max_n
            )
    return out


def scalar(v: dict) -> dict:
    """The SCALAR_KEYS of one text set's metrics."""
    return {k: v["tfidf_cosine"]["mean"] if k == "tfidf_cosine_mean" else v[k] for k in SCALAR_KEYS}


def vs_reference(per_input: dict, path: str, max_n: int, n_boot: int, seed: int) -> dict:
    """This archive's per-input scores against another archive's on the same prompts (the
    base model's own samples, say): per key, both means over the shared prompts and their
    difference (this - reference) with a 95% bootstrap interval over prompts, paired by
    prompt; `resolved` where the interval excludes 0."""
    with Archive(path) as b:
        seqs, texts, prompt = completions(b)
        ref = per_input_metrics(b, seqs, texts, prompt, embed(texts), max_n)
        model = b.model().key
    shared = [p for p in per_input if p in ref]
    if not shared:
        raise EngineError(f"analysis.reference={path} shares no prompt with this archive")
    out = {"archive": str(path), "model": model, "n_prompts": len(shared)}
    for k in SCALAR_KEYS:
        out[k] = paired_over_prompts(
            {p: scalar(v)[k] for p, v in per_input.items()},
            {p: scalar(v)[k] for p, v in ref.items()},
            n_boot,
            seed,
        )
    return out


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    m = a.model()
    seqs, texts, prompt = completions(a)
    emb = embed(texts)
    V = m.vocab_size
    per_input = per_input_metrics(a, seqs, texts, prompt, emb, c.max_n)
    first = [
        int(np.flatnonzero(prompt == p)[0]) for p in range(len(a.prompts)) if (prompt == p).any()
    ]
    cross = metrics([texts[i] for i in first], [seqs[i] for i in first], emb[first], V, c.max_n)
    per_prompt = {k: np.array([scalar(v)[k] for v in per_input.values()]) for k in SCALAR_KEYS}
    avg = {  # NaN where no prompt has the score (e.g. n-gram diversity of texts under 4 words)
        k: float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")
        for k, x in per_prompt.items()
    }
    draws = cross_input_draws(
        texts, seqs, emb, prompt, len(a.prompts), V, c.max_n, int(c.n_draws), int(c.seed)
    )
    clusters, figs = tsne_clusters(emb, prompt, int(c.max_k), int(c.seed), out, m.key)
    write_csv(
        out,
        "completions.csv",
        {"sample": np.arange(a.n_complete), "prompt": prompt, "cluster": clusters, "text": texts},
    )
    summary = {
        "model": m.key,
        "temperature": sampling_temperature(a),
        "per_input": per_input,
        "per_input_mean": avg,
        "per_input_mean_ci95": {
            k: bootstrap_over_prompts(x, int(c.n_boot), int(c.seed)) for k, x in per_prompt.items()
        },
        "cross_input": cross,
        "cross_input_draws": draws,
        "figures": figs,
    }
    if c.reference:
        summary["vs_reference"] = vs_reference(
            per_input, str(c.reference), c.max_n, int(c.n_boot), int(c.seed)
        )
    return summary


def sampling_temperature(a: Archive):
    """The temperature the completions were sampled at (the run key's), or None."""
    return a.run_key.get("temperature")


def tsne_clusters(emb, prompt, max_k, seed, out: Path, key: str):
    """k-means on the embeddings (k by silhouette), shown on a t-SNE map."""
    if len(emb) < 5:
        return np.zeros(len(emb), int), []
    labels, k, _ = kmeans_by_silhouette(emb, max_k, seed)
    xy = tsne_xy(emb, seed)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for p in np.unique(prompt):
        sel = prompt == p
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            c=labels[sel],
            cmap="tab10",
            vmin=0,
            vmax=9,
            marker="os^Dv"[int(p) % 5],
            s=22,
            label=f"prompt {int(p)}",
        )
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"{key}: SBERT t-SNE, colour = k-means cluster (k={k})")
    ax.legend(fontsize=7)
    return labels, save_figure(fig, out, "tsne_clusters")


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    c = s.get("cross_input", {})
    keys = [
        k
        for k in ("ead_tokens_mean", "ead_words_kirk", "sentbert_diversity", "tfidf_cosine")
        if k in c
    ]
    val = lambda x: x.get("mean", x) if isinstance(x, dict) else x
    return (
        [
            f"{s.get('model')}: "
            + ", ".join(
                f"{k} {val(c[k]):.3f}"
                if isinstance(val(c[k]), (int, float))
                else f"{k} {val(c[k])}"
                for k in keys
            )
        ]
        if keys
        else []
    )


ANALYSIS = Analysis(name="diversity", run=run, terminal_lines=terminal_lines)
