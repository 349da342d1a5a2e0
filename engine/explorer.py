"""The token explorer: one standalone HTML page of an archive's samples
(`python -m engine inspect ARCHIVE --html OUT.html`), no server, no network.

Every number the page shows is computed here, with the project's kernels on the rows read per
sample through the archive reader (`ModelView.rows`), and embedded as JSON (`page_data`); the
page's script (`explorer.html`, inline CSS and JS) only lays them out and colours them.  Per
step and model: the top-k next tokens (ids, text, log-probabilities from `kernels.log_softmax`
and their probabilities), the row's entropy (`kernels.entropy`), the sampled token's
log-probability and rank (`kernels.token_stats`); per step, the measures the tokens can be
coloured by (`MEASURES`; the paired ones from `kernels.pair_stats` of the base and aligned
rows).  Reads archives only: no model, no torch.

Layer: beside the runtime, below the verbs (`.importlinter`): it reads the archive package and
the kernels, and neither the runtime nor the verbs.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

import kernels as K
from engine.archive import Archive, ModelView
from engine.archive.format import FINISH_REASONS
from engine.cli import parse_samples
from engine.errors import EngineError
from engine.files import staged

#: the page's markup, style and script; `page()` fills in the title and the data
TEMPLATE = Path(__file__).with_name("explorer.html")

#: samples shown when none are chosen: the first complete ones
DEFAULT_SAMPLES = 32

#: significant digits of the embedded floats (float32 kernels' outputs carry about 7)
DIGITS = 6

#: what the tokens can be coloured by: id -> (name, label, scale, needs the aligned model).
#: Scales: `sequential` from `lo` to `hi`, `diverging` around 0 (`lo` = -`hi`), `classes` (the
#: token-shift classes of Lin et al. 2023, URIAL: unshifted = rank 1, marginal = 2-3,
#: shifted > 3).  Labels name the models by their group keys.
MEASURES = {
    "p": ("p(sampled token)", "p(sampled token) under {base}", "sequential", False),
    "entropy": ("entropy (nats)", "entropy of {base}'s row (nats)", "sequential", False),
    "kl": ("KL(base ‖ aligned)", "KL({base} ‖ {aligned}) at the step (nats)", "sequential", True),
    "dlogp": (
        "Δ log p (aligned − base)",
        "Δ log p of the sampled token ({aligned} − {base}, nats)",
        "diverging",
        True,
    ),
    "shift": (
        "token shift",
        "token shift: {base}'s rank of {aligned}'s top token",
        "classes",
        True,
    ),
}
#: token-shift classes: (name, lowest rank, highest rank)
SHIFT_CLASSES = (("unshifted", 1, 1), ("marginal", 2, 3), ("shifted", 4, None))


def check_out(out: str | Path, archive: str | Path, overwrite: bool) -> Path:
    """The page's path, checked before anything is read: an existing file is replaced only
    with `overwrite`, never a directory or the archive itself."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise EngineError(f"{out} is a directory; give the page's file path")
    if out.exists() and out.resolve() == Path(archive).expanduser().resolve():
        raise EngineError(f"{out} is the archive itself; write the page elsewhere")
    if out.exists() and not overwrite:
        raise EngineError(f"{out} exists; pass --overwrite to replace it")
    return out


def choose_models(
    a: Archive, base: str | None = None, aligned: str | None = None
) -> tuple[ModelView, ModelView | None]:
    """Base: `base` or the generator; aligned: `aligned`, else the first other group (as the
    pair analysis chooses), else None (an archive of one model)."""
    b = a.model(base)
    if aligned is not None:
        if aligned == b.key:
            raise EngineError(f"--aligned {aligned} is the base model; name another group")
        q = a.model(aligned)
    else:
        others = [k for k in a.models if k != b.key]
        q = a.model(others[0]) if others else None
    if q is not None and q.vocab_size != b.vocab_size:
        raise EngineError(
            f"{b.key} ({b.vocab_size} logits per row) and {q.key} ({q.vocab_size}) do not share "
            f"token positions; name another group with --aligned"
        )
    return b, q


def available(a: Archive, models) -> int:
    """Samples 0..n-1 that every chosen model has rows of."""
    return min([a.n_complete, *(m.n_complete for m in models)])


def _num(x, digits: int = DIGITS):
    """A JSON-ready copy of a number or array: `digits` significant digits, None where not
    finite (JSON has no NaN or infinity)."""
    arr = np.asarray(x, dtype=np.float64)
    flat = [float(f"{v:.{digits}g}") if np.isfinite(v) else None for v in arr.ravel().tolist()]
    if arr.ndim == 0:
        return flat[0]
    return np.array(flat, dtype=object).reshape(arr.shape).tolist()


def _int(x) -> list:
    """Integers (ranks) as a JSON-ready list, None where not finite."""
    return [int(v) if np.isfinite(v) else None for v in np.asarray(x, np.float64).tolist()]


def top_k(lp: np.ndarray, k: int) -> np.ndarray:
    """[step, k] ids of each row's k largest log-probabilities, largest first, ties in id order
    (as `inspect --step`'s stable sort); NaN entries count as -inf."""
    lp = np.where(np.isnan(lp), -np.inf, lp)
    k = min(k, lp.shape[-1])
    out = np.empty((lp.shape[0], k), dtype=np.int64)
    if not lp.shape[0]:
        return out
    part = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    kth = np.take_along_axis(lp, part, -1).min(-1)
    for t, (row, lo) in enumerate(zip(lp, kth)):
        cand = np.flatnonzero(row >= lo)  # the k largest and every tie of the k-th
        out[t] = cand[np.argsort(-row[cand], kind="stable")][:k]
    return out


def model_steps(rows: np.ndarray, tokens: np.ndarray, k: int) -> dict:
    """One model's numbers at every step of one sample: its top-k (ids, log-probs,
    probabilities), the row's entropy and the sampled token's log-probability and rank."""
    lp = K.log_softmax(rows)  # float32 [step, vocab]
    top = top_k(lp, k)
    top_lp = np.take_along_axis(lp, top, -1).astype(np.float64)
    st = K.token_stats(rows, tokens)
    return {
        "top": top.tolist(),
        "logp": _num(top_lp),
        "p": _num(np.exp(top_lp)),
        "entropy": _num(K.entropy(rows)),
        "token_logp": _num(st.logprob),
        "token_p": _num(np.exp(st.logprob)),
        "token_rank": _int(st.rank),
        "mean_p": _num(np.exp(st.logprob).mean()) if len(tokens) else None,
    }


def sample_data(a: Archive, base: ModelView, aligned: ModelView | None, i: int, k: int) -> dict:
    s = a.samples()
    n = int(s["length"][i])
    tokens = np.asarray(s["tokens"][i, :n], dtype=np.int64)
    prompt = int(s["prompt_index"][i])
    reasons = {v: name for name, v in FINISH_REASONS.items()}
    rows = {base.key: base.rows(i, slice(0, n))}
    if aligned is not None:
        rows[aligned.key] = aligned.rows(i, slice(0, n))
    models = {key: model_steps(r, tokens, k) for key, r in rows.items()}
    mean_p = {key: r.pop("mean_p") for key, r in models.items()}
    b = models[base.key]
    measures = {"p": b["token_p"], "entropy": b["entropy"]}
    if aligned is not None:
        ps = K.pair_stats(rows[base.key], rows[aligned.key], tokens)
        measures["kl"] = _num(ps.kl_pq)
        measures["dlogp"] = _num(ps.logq_token - ps.logp_token)
        measures["shift"] = _int(ps.q_top_rank_in_p)
    return {
        "sample": i,
        "prompt": prompt,
        "prompt_text": base.prompt_text[prompt],
        "finish": reasons.get(int(s["finish_reason"][i]), "?"),
        "tokens": tokens.tolist(),
        "mean_p": mean_p[base.key],  # as `inspect --render` prints it
        "measures": measures,
        "models": models,
    }


def prompt_samples(a: Archive) -> dict[int, list[int]]:
    """prompt index -> its complete samples, in order."""
    out: dict[int, list[int]] = {}
    for i, p in enumerate(a.samples()["prompt_index"][: a.n_complete].tolist()):
        out.setdefault(int(p), []).append(i)
    return out


def perturbation_view(a: Archive, base: ModelView, d: dict) -> dict | None:
    """For a sample of a perturbation archive (`/lineage`): its variant (the edited or the
    control prefix of one parent, cut at the same step) and the other variant's continuation
    at the same position in its prompt (the j-th continuation of the edited prefix beside the
    j-th of the control prefix), with the generator's p of each of its tokens: the page
    shows the two continuations aligned by generated step.  None for other archives."""
    lin = a.lineage()
    if lin is None:
        return None
    p = d["prompt"]
    twin = [
        q
        for q in range(len(lin["variant"]))
        if q != p
        and lin["parent_sample"][q] == lin["parent_sample"][p]
        and lin["cut"][q] == lin["cut"][p]
        and lin["variant"][q] != lin["variant"][p]
    ]
    out = {
        "variant": lin["variant"][p],
        "parent": int(lin["parent_sample"][p]),
        "cut": int(lin["cut"][p]),
        "edit": lin["edit"][p],
        "other": None,
    }
    by_prompt = prompt_samples(a)
    mine = by_prompt.get(p, [])
    if not twin or d["sample"] not in mine:
        return out
    theirs = by_prompt.get(twin[0], [])
    j = mine.index(d["sample"])
    if j >= len(theirs) or theirs[j] >= base.n_complete:
        return out
    i = theirs[j]
    s = a.samples()
    n = int(s["length"][i])
    tokens = np.asarray(s["tokens"][i, :n], dtype=np.int64)
    st = K.token_stats(base.rows(i, slice(0, n)), tokens)
    out["other"] = {
        "sample": int(i),
        "variant": lin["variant"][twin[0]],
        "prompt_text": base.prompt_text[twin[0]],
        "tokens": tokens.tolist(),
        "token_p": _num(np.exp(st.logprob)),
    }
    return out


def answers_view(a: Archive, models) -> dict | None:
    """For a candidate-answer archive (`/answers`, sample i = candidate i as a whole answer):
    each model's exact distribution over the candidates, log P(candidate) = the sum of its
    steps' token log-probabilities (`kernels.token_stats`), normalised over the set (as
    `analysis=answers` computes it), and the mass the set holds; None for other archives."""
    ans = a.answers()
    if ans is None:
        return None
    n = available(a, models)
    s = a.samples()
    out = {"candidates": ans["candidates"][:n], "models": {}, "reference": None}
    if ans["reference"] is not None:
        ref = np.asarray(ans["reference"][:n], np.float64)
        out["reference"] = _num(ref / ref.sum())
    for m in models:
        lp = np.array(
            [
                float(
                    np.sum(
                        K.token_stats(
                            m.rows(i, slice(0, int(s["length"][i]))),
                            np.asarray(s["tokens"][i, : int(s["length"][i])], np.int64),
                        ).logprob,
                        dtype=np.float64,
                    )
                )
                for i in range(n)
            ]
        )
        top = np.max(lp[np.isfinite(lp)]) if np.isfinite(lp).any() else 0.0
        w = np.exp(lp - top)
        out["models"][m.key] = {
            "logp": _num(lp),
            "p": _num(w / w.sum()),
            "mass": _num(np.exp(lp).sum()),
        }
    return out


def _range(values: list, symmetric: bool = False) -> tuple[float, float]:
    """Colour scale ends: 0 to the 99th percentile of the shown values (of |v| around 0 when
    symmetric), so that one outlier does not wash out the rest; beyond it colours saturate."""
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    hi = float(np.quantile(np.abs(v) if symmetric else v, 0.99)) if v.size else 1.0
    hi = hi if hi > 1e-9 else 1.0
    return (-hi if symmetric else 0.0), hi


def page_data(
    a: Archive, samples, topk: int = 10, base: str | None = None, aligned: str | None = None
) -> dict:
    """Everything the page shows, computed with the kernels (see the module's doc)."""
    b, q = choose_models(a, base, aligned)
    models = [b] if q is None else [b, q]
    n = available(a, models)
    for i in samples:
        if not 0 <= i < n:
            raise EngineError(f"sample {i} out of range (0..{n - 1})")
    data = [sample_data(a, b, q, int(i), topk) for i in samples]
    for d in data:
        view = perturbation_view(a, b, d)
        if view is not None:
            d["perturbation"] = view
    pieces = {}
    for m in models:
        ids = {t for d in data for t in d["tokens"]}
        ids.update(
            t
            for d in data
            if (d.get("perturbation") or {}).get("other")
            for t in d["perturbation"]["other"]["tokens"]
        )
        ids.update(t for d in data for row in d["models"][m.key]["top"] for t in row)
        text = m.text
        pieces[m.key] = {str(t): text.piece(t) for t in sorted(ids)}
    names = {"base": b.key, "aligned": q.key if q is not None else ""}
    measures = []
    for mid, (name, label, scale, paired) in MEASURES.items():
        if paired and q is None:
            continue
        values = [v for d in data for v in d["measures"][mid]]
        entry = {"id": mid, "name": name, "label": label.format(**names), "scale": scale}
        if scale == "classes":
            entry["classes"] = [{"name": c, "lo": lo, "hi": hi} for c, lo, hi in SHIFT_CLASSES]
        elif mid == "p":
            entry["lo"], entry["hi"] = 0.0, 1.0
        else:
            entry["lo"], entry["hi"] = _num(_range(values, symmetric=scale == "diverging"))
        measures.append(entry)
    return {
        "archive": a.path.name,
        "path": str(a.path),
        "generator": a.generator,
        "n_samples": a.n_complete,
        "topk": int(min(topk, b.vocab_size)),
        "models": [
            {
                "key": m.key,
                "role": "base" if m is b else "aligned",
                "generator": m.key == a.generator,
                "source": str(m.provenance.get("source", "")),
                "name": str(m.provenance.get("name", "")),
            }
            for m in models
        ],
        "measures": measures,
        "pieces": pieces,
        "samples": data,
        "answers": answers_view(a, models),
    }


def script_json(data: dict) -> str:
    """JSON safe inside <script type="application/json">: no `<`, `>` or `&` survives (they
    occur only inside strings, as \\u escapes), so no `</script>` or comment can end it."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(data: dict) -> str:
    title = f"token explorer · {data['archive']}"
    fill = {"__TITLE__": html.escape(title), "__DATA__": script_json(data)}
    # one pass: a file or token named like a placeholder is never substituted again
    return re.sub("__TITLE__|__DATA__", lambda m: fill[m.group(0)], TEMPLATE.read_text("utf-8"))


def write(
    a: Archive,
    out: str | Path,
    samples=None,
    topk: int = 10,
    base: str | None = None,
    aligned: str | None = None,
    overwrite: bool = False,
    limit: int = DEFAULT_SAMPLES,
) -> dict:
    """Write the explorer page of `samples` (indices, or a list like `0,3,10-20` as
    `engine.cli.parse_samples` reads it; default: the first `limit` samples every chosen model
    has rows of) to `out`, atomically (`engine.files.staged`); returns what was written."""
    out = check_out(out, a.path, overwrite)
    if topk < 1:
        raise EngineError("--topk must be >= 1")
    b, q = choose_models(a, base, aligned)
    n = available(a, [b] if q is None else [b, q])
    if isinstance(samples, str):
        samples = parse_samples(samples, n)
    elif samples is None:
        samples = range(min(limit, n))
    data = page_data(a, list(samples), topk, base, aligned)
    text = page(data)
    with staged(out) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return {
        "out": str(out),
        "bytes": len(text.encode("utf-8")),
        "samples": len(data["samples"]),
        "steps": sum(len(d["tokens"]) for d in data["samples"]),
        "models": [m["key"] for m in data["models"]],
    }
