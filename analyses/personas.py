"""Customer personas and their product reviews (Exp 1 of Mohammadi 2024, "Creativity Has Left
the Chat"), from an archive dumped with `prompts=personas`.

Per sample the completion (EOS removed) is parsed into first/last name, gender, age,
nationality, ethnicity, MBTI type and review (analyses/lib/persona_parse.py).  Reported:
- parse outcome per field (ok / invalid / missing) and the share of complete forms: a sample
  that fails to parse is counted, never dropped;
- per attribute over its parsed values: the full distribution, the number of distinct values,
  the entropy H (nats), the normalised entropy H / log(min(n, K)) (1 = as varied as n values
  can be; K = 16 for MBTI, 121 for ages 0..120, unbounded otherwise) and the evenness
  H / log(distinct);
- reviews: length in characters and words, VADER compound sentiment (Hutto and Gilbert 2014;
  positive >= 0.05, negative <= -0.05, as VADER recommends);
- review sentences embedded with all-MiniLM-L6-v2, k-means with k by silhouette, the sentences
  nearest each centroid as examples, and a t-SNE map.
Compare models by running it on each model's archive (multirun: archive=base.h5,chat.h5).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from analyses.lib.clusters import kmeans_by_silhouette, tsne_xy
from analyses.lib.common import mean_std, save_figure, write_csv
from analyses.lib.persona_parse import FIELDS, lead_field, parse, sentences
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.archive.format import FINISH_REASONS

log = logging.getLogger(__name__)
EOS = FINISH_REASONS["eos"]  # /samples/finish_reason of a sample that ended on EOS
CATEGORIES = {"mbti": 16, "age": 121}
nan = float("nan")
ATTRIBUTES = FIELDS[:-1]  # every field but the review


def persona_prompts() -> list[str]:
    from omegaconf import OmegaConf

    from engine.config import CONF

    return list(OmegaConf.load(CONF / "prompts" / "personas.yaml").texts)


def completions(a: Archive) -> tuple[list[str], list[str | None], np.ndarray]:
    """(completion texts without EOS, the field each one starts in, finish reasons)."""
    s, m = a.samples(), a.model()
    text = m.text
    leads = [lead_field(t) for t in m.prompt_text]
    texts, lead = [], []
    for i in range(a.n_complete):
        n = int(s["length"][i]) - int(s["finish_reason"][i] == EOS)
        texts.append(text(s["tokens"][i, :n]))
        lead.append(leads[int(s["prompt_index"][i])])
    return texts, lead, s["finish_reason"]


def diversity_stats(name: str, values) -> dict:
    """Counts (most common first) and diversity statistics of one attribute's parsed values."""
    counts = Counter(values).most_common()
    c = np.array([k for _, k in counts], np.float64)
    n, d = int(c.sum()), len(counts)
    H = abs(float((c / n * np.log(c / n)).sum())) if n else nan  # abs: no -0.0 for one value
    cap = min(n, CATEGORIES.get(name, n))
    return {
        "n": n,
        "distinct": d,
        "entropy_nats": H,
        "normalized_entropy": H / np.log(cap) if cap > 1 else nan,
        "evenness": H / np.log(d) if d > 1 else nan,
        "counts": [[v, k] for v, k in counts],
    }


def spread(x) -> dict:
    x = np.asarray(x, np.float64)
    if not x.size:
        return {"n": 0, "mean": nan, "std": nan, "min": nan, "median": nan, "max": nan}
    return {
        "n": int(x.size),
        **mean_std(x),
        "min": float(x.min()),
        "median": float(np.median(x)),
        "max": float(x.max()),
    }


def sentiment(reviews: list[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    return np.array([vader.polarity_scores(r)["compound"] for r in reviews], np.float64)


def sentiment_summary(scores: np.ndarray) -> dict:
    edges = np.linspace(-1, 1, 21)
    n = max(len(scores), 1)
    return {
        **spread(scores),
        "share_positive": float((scores >= 0.05).sum() / n),
        "share_neutral": float((np.abs(scores) < 0.05).sum() / n),
        "share_negative": float((scores <= -0.05).sum() / n),
        "histogram": {"edges": edges, "counts": np.histogram(scores, edges)[0]},
    }


def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    key = a.model().key
    texts, lead, finish = completions(a)
    people = [parse(t, ld) for t, ld in zip(texts, lead)]
    N = len(people)
    if list(a.prompts) != persona_prompts():
        log.warning(
            "%s was not dumped with prompts=personas: the persona form is parsed anyway", a.path
        )
    elif N and all(s == "missing" for p in people for s in p.status.values()):
        log.warning("no completion of %s filled in any field of the persona form", a.path)
    parse_report = {}
    for f in FIELDS:
        st = Counter(p.status[f] for p in people)
        parse_report[f] = {
            "ok": st["ok"],
            "invalid": st["invalid"],
            "missing": st["missing"],
            "failure_rate": (N - st["ok"]) / N if N else float("nan"),
        }
    attrs = {
        f: diversity_stats(f, [p.values[f] for p in people if f in p.values]) for f in ATTRIBUTES
    }
    ages = [p.values["age"] for p in people if "age" in p.values]
    has_review = [i for i, p in enumerate(people) if "review" in p.values]
    reviews = [people[i].values["review"] for i in has_review]
    scores = sentiment(reviews)
    score_of = dict(zip(has_review, scores.tolist()))
    sents, clusters, figs = review_clusters(reviews, has_review, c, out, key)
    figs = (
        attribute_figure(people, attrs, ages, out, key, int(c.top_n_plot))
        + review_figure(reviews, scores, out, key)
        + figs
    )
    complete = [i for i, p in enumerate(people) if p.complete]
    write_csv(
        out,
        "personas.csv",
        {
            "sample": np.arange(N),
            "finish": np.where(finish[:N] == EOS, "eos", "length"),
            **{f: [p.values.get(f, "") for p in people] for f in ATTRIBUTES},
            **{f"{f}_status": [p.status[f] for p in people] for f in FIELDS},
            "review_chars": [len(p.values.get("review", "")) for p in people],
            "sentiment": [score_of.get(i, "") for i in range(N)],
            "text": texts,
        },
    )
    rows = [(f, v, k) for f in ATTRIBUTES for v, k in attrs[f]["counts"]]
    write_csv(
        out,
        "attributes.csv",
        {
            "attribute": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "count": [r[2] for r in rows],
        },
    )
    return {
        "model": key,
        "n_personas": N,
        "n_truncated": int((finish[:N] != EOS).sum()),
        "complete_forms": len(complete),
        "complete_form_rate": len(complete) / N if N else 0.0,
        "incomplete_examples": [i for i in range(N) if not people[i].complete][:5],
        "parse": parse_report,
        "attributes": attrs,
        "age": spread(ages),
        "reviews": {
            "n": len(reviews),
            "length_chars": spread([len(r) for r in reviews]),
            "length_words": spread([len(r.split()) for r in reviews]),
            "sentiment": sentiment_summary(scores),
        },
        "sentences": {"n": len(sents), **clusters},
        "figures": figs,
    }


def review_clusters(reviews, owners, c, out: Path, key: str):
    """Sentence embeddings of all reviews, k-means (k by silhouette), examples per cluster."""
    from analyses.lib.embeddings import embed

    sents, owner = [], []
    for i, r in zip(owners, reviews):
        for s in sentences(r):
            sents.append(s)
            owner.append(i)
    if len(sents) < 5:
        return sents, {"k": 0, "clusters": []}, []
    emb = embed(sents)
    labels, k, sil = kmeans_by_silhouette(emb, int(c.max_k), int(c.seed))
    clusters = []
    for j in range(k):
        idx = np.flatnonzero(labels == j)
        centre = emb[idx].mean(0)
        order = idx[np.argsort(-(emb[idx] @ (centre / np.linalg.norm(centre))), kind="stable")]
        examples = list(dict.fromkeys(sents[i] for i in order))[: int(c.n_examples)]
        clusters.append(
            {
                "cluster": j,
                "size": len(idx),
                "share": len(idx) / len(sents),
                "reviews": len({owner[i] for i in idx}),
                "examples": examples,
            }
        )
    clusters.sort(key=lambda d: -d["size"])
    write_csv(out, "sentences.csv", {"sample": owner, "cluster": labels, "sentence": sents})
    xy = tsne_xy(emb, int(c.seed))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for d in clusters[:10]:
        sel = labels == d["cluster"]
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, label=f"{d['size']}: {d['examples'][0][:40]}")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"{key}: review sentences, k-means k={k} (SBERT)")
    ax.legend(fontsize=6, loc="best", title="size: nearest sentence", title_fontsize=6)
    return (
        sents,
        {"k": k, "silhouette": sil, "clusters": clusters},
        save_figure(fig, out, "sentence_clusters"),
    )


def attribute_figure(people, attrs, ages, out: Path, key: str, top: int) -> list[str]:
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    N = max(len(people), 1)
    for ax, f in zip(
        axes.flat, ("first_name", "last_name", "gender", "nationality", "ethnicity", "mbti")
    ):
        counts = attrs[f]["counts"][:top]
        failed = sum(p.status[f] != "ok" for p in people)
        labels = [str(v) for v, _ in counts] + ["(not parsed)"]
        share = [100 * k / N for _, k in counts] + [100 * failed / N]
        ax.barh(labels[::-1], share[::-1], color=["0.6"] + ["C0"] * len(counts))
        ax.set_xlabel("% of personas")
        hn = attrs[f]["normalized_entropy"]
        ax.set_title(
            f"{f.replace('_', ' ')}: {attrs[f]['distinct']} distinct, "
            f"normalised entropy {'n/a' if np.isnan(hn) else f'{hn:.2f}'}",
            fontsize=9,
        )
        ax.tick_params(axis="y", labelsize=7)
    ax = axes.flat[6]
    if ages:
        ax.hist(ages, bins=np.arange(min(ages), max(ages) + 2) - 0.5, color="C0")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("age (years)")
    ax.set_ylabel("personas")
    ax.set_title(f"age: {attrs['age']['distinct']} distinct", fontsize=9)
    ax = axes.flat[7]
    bottom = np.zeros(len(FIELDS))
    for status, colour in (("ok", "C2"), ("invalid", "C1"), ("missing", "C3")):
        v = np.array([100 * sum(p.status[f] == status for p in people) / N for f in FIELDS])
        ax.barh([f.replace("_", " ") for f in FIELDS], v, left=bottom, color=colour, label=status)
        bottom += v
    ax.set_xlabel("% of personas")
    ax.set_title("parse outcome per field", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"{key}: {len(people)} generated personas")
    fig.tight_layout()
    return save_figure(fig, out, "attributes")


def review_figure(reviews, scores, out: Path, key: str) -> list[str]:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.hist([len(r) for r in reviews], bins=20, color="C0", label=key)
    a1.set_xlabel("review length (characters)")
    a1.set_ylabel("reviews")
    a2.hist(scores, bins=np.linspace(-1, 1, 21), color="C0", label=key)
    a2.set_xlabel("VADER compound sentiment (-1 negative, +1 positive)")
    a2.set_ylabel("reviews")
    for ax in (a1, a2):
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(f"{key}: {len(reviews)} reviews")
    fig.tight_layout()
    return save_figure(fig, out, "reviews")


ANALYSIS = Analysis(name="personas", run=run)
