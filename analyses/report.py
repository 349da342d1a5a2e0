"""One-page base-vs-aligned report from the summaries of other analysis runs (no archive).

`python -m analyses analysis=report analysis.runs=[DIR, ...]` reads every `summary.json` under
the given directories (a Hydra multirun sweep directory, or several), picks the base and the
aligned model (`analysis.base` / `analysis.aligned`, default: from the `pair` summaries), and
writes `report.md`, `report.html` and `report.json` into its run directory.

Every number in the report is looked up in a summary by its key path, and report.json lists
each one with the file and path it came from, so a reader (or a test) can check it; every
figure is either a figure an analysis wrote (referenced by path) or drawn here from summary
numbers only (`attractor_curves`, `gamma_vs_predicted`).
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from analyses.lib.common import save_figure, write_json
from analyses.protocol import Analysis
from engine.errors import EngineError


class Sources:
    """Every summary found, by analysis name, and a record of every number cited."""

    def __init__(self, dirs, label: str = ""):
        self.label = label  # which prompts these runs are on, as the report says it
        self.runs: list[tuple[Path, dict]] = []
        for d in dirs:
            d = Path(str(d)).expanduser()
            if not d.is_dir():
                raise EngineError(f"report: {d} is not a directory of analysis runs")
            for f in sorted(d.rglob("summary.json")):
                s = json.loads(f.read_text())
                if s.get("analysis") and s.get("analysis") != "report":
                    self.runs.append((f.resolve(), s))
        if not self.runs:
            raise EngineError(f"report: no summary.json under {', '.join(map(str, dirs))}")
        self.cited: list[dict] = []

    def of(self, analysis: str, **match):
        return [
            (f, s)
            for f, s in self.runs
            if s["analysis"] == analysis and all(s.get(k) == v for k, v in match.items())
        ]

    def cite(self, found, *path):
        """The value at `path` of a (file, summary) pair, recorded; None where absent."""
        if not found:
            return None
        f, s = found
        v = s
        for k in path:
            if not isinstance(v, dict) or str(k) not in v:
                return None
            v = v[str(k)]
        self.cited.append({"file": str(f), "path": [str(k) for k in path], "value": v})
        return v


def fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if not isinstance(v, float):
        return str(v)
    out = f"{v:.{digits}f}"
    return out[1:] if out.startswith("-") and float(out) == 0 else out  # no "-0.000"


def pm(mean, sd, n=None, digits=3) -> str:
    out = f"{fmt(mean, digits)} ± {fmt(sd, digits)}"
    return out + (f" (n={n})" if n is not None else "")


def ci(g, lo_hi, digits=3) -> str:
    if g is None:
        return "–"
    return (
        f"{fmt(g, digits)} [{fmt(lo_hi[0], digits)}, {fmt(lo_hi[1], digits)}]"
        if lo_hi
        else fmt(g, digits)
    )


def pick_models(src: Sources, c) -> tuple[str, str]:
    pairs = src.of("pair")
    base = c.base or (pairs[0][1]["base"] if pairs else None)
    aligned = c.aligned or (pairs[0][1]["aligned"] if pairs else None)
    if not base or not aligned:
        raise EngineError("report: name analysis.base and analysis.aligned (no pair summary found)")
    return base, aligned


def own(src: Sources, analysis: str, model: str):
    """The summary of `analysis` over the archive that `model` generated."""
    found = src.of(analysis, generator=model)
    return found[0] if found else None


def pair_on(src: Sources, generator: str, base: str, aligned: str):
    found = src.of("pair", generator=generator, base=base, aligned=aligned)
    return found[0] if found else None


def self_check_cell(src: Sources, generator: str, base: str, aligned: str) -> str:
    """The generator's run self-check, from the pair summary of its own archive."""
    p = pair_on(src, generator, base, aligned)
    side = "base_provenance" if generator == base else "aligned_provenance"
    diff = src.cite(p, side, "self_check", "max_abs_diff")
    if diff is None:
        return "– (not recorded)"
    return f"{diff:.2g} ({src.cite(p, side, 'self_check', 'bound'):.2g})"


def headline(src: Sources, base: str, aligned: str) -> list[tuple[str, str, str]]:
    """(metric, base cell, aligned cell): each model on its own completions."""
    rows = []
    for label, key, digits in (
        ("top-5 entropy, bits (mean ± std over completions)", "top5_entropy_bits", 3),
        ("full entropy, nats (mean ± std over completions)", "entropy_nats", 3),
    ):
        cells = []
        for m in (base, aligned):
            e = own(src, "entropy", m)
            n = src.cite(e, "models", m, key, "n_completions")
            cells.append(
                pm(
                    src.cite(e, "models", m, key, "mean"),
                    src.cite(e, "models", m, key, "std"),
                    n,
                    digits,
                )
            )
        rows.append((label, *cells))
    for label, path in (
        (
            "SBERT diversity, per input (1 − mean pairwise cosine)",
            ("per_input_mean", "sentbert_diversity"),
        ),
        ("TF-IDF cosine similarity, per input (mean)", ("per_input_mean", "tfidf_cosine_mean")),
        ("EAD, per input (mean over n = 1…5, tokens)", ("per_input_mean", "ead_tokens_mean")),
        ("EAD, per input (Kirk et al.'s words, V = 50257)", ("per_input_mean", "ead_words_kirk")),
    ):
        rows.append(
            (label, *(fmt(src.cite(own(src, "diversity", m), *path)) for m in (base, aligned)))
        )
    for label, key in (
        (
            "compression ratio, gzip (Shaib et al.'s code; higher = more repetitive)",
            "compression_ratio_gzip_shaib",
        ),
        (
            "homogenization, ROUGE-L (Shaib et al.'s code; higher = more alike)",
            "homogenization_rougel_shaib",
        ),
        ("Self-BLEU (Texygen's definition; higher = more alike)", "self_bleu_texygen"),
    ):
        cells = []
        for m in (base, aligned):
            d = own(src, "diversity", m)
            cells.append(
                ci(
                    src.cite(d, "per_input_mean", key),
                    src.cite(d, "per_input_mean_ci95", key, "ci95"),
                )
            )
        rows.append((f"{label}, per input [95% CI over prompts]", *cells))
    for label, path, fn in (
        (
            "KL(base ‖ aligned), nats per step (mean ± stderr)",
            ("kl_base_aligned",),
            lambda p, s: pm(src.cite(p, *s, "mean"), src.cite(p, *s, "stderr"), digits=4),
        ),
        (
            "pooled per-step γ [95% CI]",
            ("gamma", "pooled"),
            lambda p, s: ci(src.cite(p, *s, "gamma"), src.cite(p, *s, "ci95")),
        ),
        (
            "sequence-level γ, within-prompt slope [95% CI]",
            ("gamma", "sequence_level_pooled"),
            lambda p, s: ci(src.cite(p, *s, "gamma"), src.cite(p, *s, "ci95")),
        ),
    ):
        rows.append(
            (
                f"{label}, on the completions of each model",
                *(fn(pair_on(src, m, base, aligned), path) for m in (base, aligned)),
            )
        )
    rows += mitigation_rows(src, base, aligned)
    rows += layers_rows(src, base, aligned)
    rows.append(
        (
            "run self-check of each model's own archive: max |Δ log p| of one stored "
            "sample against a teacher-forced forward, nats (bound)",
            *(self_check_cell(src, m, base, aligned) for m in (base, aligned)),
        )
    )
    pred, alignment = None, None
    for m in (base, aligned):
        p = pair_on(src, m, base, aligned)
        alignment = src.cite(p, "aligned_provenance", "alignment") if p else None
        if alignment:
            al = json.loads(alignment)
            pred = 1 + al["alpha"] / al["beta"]
            break
    rows.append(
        (
            "predicted γ = 1 + α/β (sequence level; from the aligned model's provenance)",
            "1 (reference)",
            fmt(pred, 3) if pred else "– (not an aligned twin)",
        )
    )
    if alignment:
        al = json.loads(alignment)
        rows.append(
            (
                "how the aligned model was trained (its provenance)",
                "–",
                f"DPO, α = {fmt(al.get('alpha'), 2)}, β = {fmt(al.get('beta'), 2)}, "
                f"{al.get('n_pairs')} pairs, {al.get('steps')} steps; loss "
                f"{fmt(al.get('final_loss'), 3)}, reward accuracy {fmt(al.get('reward_accuracy'), 3)} "
                f"(means over the last epoch)",
            )
        )

    def recovery(v):
        rt = v["recovery_time"]
        return f"median {fmt(rt['median'], 1)} steps, {rt['recovered']} recovered / {rt['censored']} censored"

    def influence(v):
        return (
            f"half-life {fmt(v['half_life_steps'], 2)} steps, settles at "
            f"{fmt(v['settle_step_mean_curve'], 0)} ({100 * v['settle_step']['censored_share']:.0f}% "
            f"of continuations censored)"
        )

    rows.append(
        (
            "attractor: recovery time after the edit (per variant)",
            *attractor_cells(src, (base, aligned), "variants", recovery),
        )
    )
    cells = attractor_cells(src, (base, aligned), "influence", influence)
    rows.append(("attractor: the edit's influence on identical continuations", *cells))
    return rows


def mitigation_on(src: Sources, generator: str, base: str, aligned: str):
    found = src.of("mitigation", generator=generator, base=base, aligned=aligned)
    return found[0] if found else None


def mitigation_rows(src: Sources, base: str, aligned: str) -> list[tuple[str, str, str]]:
    """Can temperature undo the sharpening (analysis=mitigation), on each model's completions."""
    runs = [mitigation_on(src, m, base, aligned) for m in (base, aligned)]
    if not any(runs):
        return []

    def t_star(r):
        if r is None:
            return "–"
        if not src.cite(r, "t_entropy", "found"):
            return f"not found: {src.cite(r, 't_entropy', 'reason')}"
        return ci(src.cite(r, "t_entropy", "t"), src.cite(r, "t_entropy", "ci95"), 4)

    def t_kl(r):
        return ci(src.cite(r, "t_kl", "t"), src.cite(r, "t_kl", "ci95"), 4) if r else "–"

    def kl_drop(r):
        if r is None:
            return "–"
        at = lambda k: src.cite(r, "at_temperature", k, "kl_base_aligned_mean")
        return f"{fmt(at('1'), 5)} → {fmt(at('t_entropy'), 5)} (T*) / {fmt(at('t_kl'), 5)} (min)"

    rows = [
        (
            "mitigation: T* at which the aligned model's mean entropy per step equals the "
            "base's, on the completions of each model [95% CI]",
            *(t_star(r) for r in runs),
        ),
        (
            "mitigation: argmin-KL(base ‖ aligned at T) temperature [95% CI]",
            *(t_kl(r) for r in runs),
        ),
        (
            "mitigation: KL(base ‖ aligned at T), nats per step: T = 1 → T* / argmin",
            *(kl_drop(r) for r in runs),
        ),
    ]
    # other aligned models against the same base (the alpha = 0 control twin): the noise
    # floor, one row per model, on the base's and the aligned model's completions
    others = sorted(
        {
            s["aligned"]
            for _, s in src.runs
            if s["analysis"] == "mitigation"
            and s.get("base") == base
            and s.get("aligned") not in (base, aligned)
        }
    )
    for other in others:
        on = [mitigation_on(src, m, base, other) for m in (base, aligned)]
        found = next(r for r in on if r)
        al = src.cite(found, "aligned_provenance", "alignment")
        alpha = f", α = {fmt(float(json.loads(al).get('alpha')), 2)}" if al else ""
        rows.append(
            (
                f"mitigation, {other}{alpha} (the control when α = 0): T* and argmin-KL T on "
                "the completions of each model [95% CI]",
                *(f"T* {t_star(r)}; argmin KL {t_kl(r)}" if r else "–" for r in on),
            )
        )
    return rows


def verdict(lo_hi, null: float = 1.0) -> str:
    """resolved above / below `null` when the 95% interval excludes it, else not resolved."""
    if not lo_hi or lo_hi[0] is None or lo_hi[1] is None:
        return "no interval"
    if lo_hi[0] > null:
        return f"resolved: above {null:g}"
    if lo_hi[1] < null:
        return f"resolved: below {null:g}"
    return f"not resolved: the interval holds {null:g}"


def effect_verdict(effect, noise, null) -> str:
    """`resolved` when the effect's 95% interval excludes the null (where the measure has
    one) and lies farther from it than every control's whole interval (its nearest end beyond
    the control's farthest: the effect exceeds the noise floor, whichever side the control
    fell), else `not resolved`; without a control, said so (a measure without a null then has
    no verdict).  A measure without a null (KL) is measured from 0."""
    if not effect or effect[1] is None or None in effect[1]:
        return "–"
    lo, hi = effect[1]
    # a control without an interval (too few completions for one) counts as its value
    noise = [
        n if n[1] is not None and None not in n[1] else (n[0], [n[0], n[0]])
        for n in noise
        if n and n[0] is not None
    ]
    if null is not None and lo <= null <= hi:
        return "not resolved"
    ref = 0.0 if null is None else null
    near = 0.0 if lo <= ref <= hi else min(abs(lo - ref), abs(hi - ref))
    if any(near <= max(abs(n[1][0] - ref), abs(n[1][1] - ref)) for n in noise):
        return "not resolved"
    if not noise:
        return "no control" if null is None else f"resolved against {null:g} (no control)"
    return "resolved"


#: measures of each model on its own completions against the base's (`vs_reference` of the
#: model's own summary): (analysis, key, label, digits)
OWN_MEASURES = (
    ("entropy", "entropy_nats", "full entropy per step, nats", 4),
    ("entropy", "branching_factor_yang_holtzman", "branching factor (Yang & Holtzman's code)", 3),
    ("diversity", "sentbert_diversity", "SBERT diversity per input (1 − mean cosine)", 4),
    ("diversity", "tfidf_cosine_mean", "TF-IDF cosine similarity per input", 4),
    ("diversity", "ead_tokens_mean", "EAD per input (tokens, n = 1…5)", 4),
    ("diversity", "ead_words_kirk", "EAD per input (Kirk et al.'s words)", 4),
)


def provenance_alignment(src: Sources, found) -> dict | None:
    """The aligned model's training record (α, β, ...) from a pair summary's provenance."""
    al = src.cite(found, "aligned_provenance", "alignment") if found else None
    if not al:
        return None
    al = json.loads(al) if isinstance(al, str) else al
    return al if al.get("beta") else None


def effect_rows(src: Sources, base: str, aligned: str) -> list[tuple[str, str, str, str]]:
    """Effect against noise: each measure for the aligned model (the effect) beside every
    control (the other aligned models compared with the same base: the noise floor), as
    (label, effect [95% CI], noise [95% CI], verdict).  Most measures are on the base model's
    own completions (every model reads the identical tokens); the OWN_MEASURES compare each
    model's own completions with the base's, paired by prompt.  A measure no run of `src`
    has is left out."""
    e = own(src, "entropy", base)
    others = set(src.cite(e, "paired_vs_generator") or {}) if e else set()
    others |= set(controls(src, base, aligned))
    others |= {
        s["aligned"]
        for _, s in src.runs
        if s["analysis"] == "pair" and s.get("base") == base and s.get("generator") == base
    }
    others |= {
        s["generator"]
        for _, s in src.runs
        if (s.get("vs_reference") or {}).get("model") == base and s.get("generator")
    }
    noise_models = sorted(others - {base, aligned})
    measures = []
    for name, label, digits in (
        ("entropy_nats", "full entropy per step, nats: model − base", 4),
        ("top5_entropy_bits", "top-5 entropy, bits: model − base", 4),
    ):
        get = lambda m, name=name: (  # noqa: E731
            (
                src.cite(e, "paired_vs_generator", m, name, "mean_diff"),
                src.cite(e, "paired_vs_generator", m, name, "ci95"),
            )
            if e and src.cite(e, "paired_vs_generator", m, name)
            else None
        )
        measures.append((f"{label} (mean over completions)", get, 0.0, digits))

    def kl(m):
        p = pair_on(src, base, base, m)
        return (
            (src.cite(p, "kl_base_aligned", "mean"), src.cite(p, "kl_base_aligned", "ci95"))
            if p
            else None
        )

    def mit(*path):
        def get(m):
            r = mitigation_on(src, base, base, m)
            return (
                (src.cite(r, *path[:-1], path[-1]), src.cite(r, *path[:-1], "ci95")) if r else None
            )

        return get

    def seq_gamma(m):
        p = pair_on(src, base, base, m)
        found = src.cite(p, "gamma", "sequence_level_pooled", "gamma") if p else None
        return (found, src.cite(p, "gamma", "sequence_level_pooled", "ci95")) if found else None

    def vs_base(analysis, name):
        """this model's own completions against the base's own, paired by prompt (the
        `vs_reference` of the model's own `analysis` summary, when its reference is the
        base's archive)."""

        def get(m):
            r = own(src, analysis, m)
            if not r or src.cite(r, "vs_reference", "model") != base:
                return None
            d = src.cite(r, "vs_reference", name, "delta")
            return (d, src.cite(r, "vs_reference", name, "ci95")) if d is not None else None

        return get

    def attractor_area(name):
        def get(m):
            r = own(src, "attractor", m)
            if not r or src.cite(r, "vs_reference", "model") != base:
                return None
            d = src.cite(r, "vs_reference", "variants", name, "area", "delta")
            return (d, src.cite(r, "vs_reference", "variants", name, "area", "ci95"))

        return get

    mine = own(src, "attractor", aligned)
    variants = (mine[1].get("vs_reference") or {}).get("variants", {}) if mine else {}

    predicted = [
        f"{m} {fmt(1 + al['alpha'] / al['beta'], 2)}"
        for m in [aligned, *noise_models]
        if (al := provenance_alignment(src, pair_on(src, base, base, m)))
    ]
    own_note = "each model on its own completions; paired by prompt, CI over prompts"
    measures += [
        (f"KL({base} ‖ model) per step, nats", kl, None, 5),
        ("pooled per-step γ (model ∝ base^γ)", mit("gamma_pooled", "gamma"), 1.0, 4),
        (
            "sequence-level γ, within-prompt slope"
            + (f" (theory 1 + α/β: {', '.join(predicted)})" if predicted else ""),
            seq_gamma,
            1.0,
            3,
        ),
        ("T*: the model's entropy per step matches the base's", mit("t_entropy", "t"), 1.0, 4),
    ]
    measures += [
        (f"{label}: model − base ({own_note})", vs_base(analysis, name), 0.0, digits)
        for analysis, name, label, digits in OWN_MEASURES
    ]
    measures += [
        (
            f"attractor, {name}: the edit's influence, area under I(t) (nats × steps): "
            "model − base (each model's own continuations after the same edit of its own "
            "parent; CI over seed pairs)",
            attractor_area(name),
            0.0,
            3,
        )
        for name in variants
    ]
    rows = []
    for label, get, null, digits in measures:
        effect = get(aligned)
        noise = [(m, get(m)) for m in noise_models]
        if effect is None and not any(v for _, v in noise):
            continue  # not measured on these runs (say, the model's own samples not analysed)
        shown = [f"{m}: {ci(v[0], v[1], digits)}" for m, v in noise if v]
        rows.append(
            (
                f"{label} [95% CI]",
                ci(effect[0], effect[1], digits) if effect else "–",
                "; ".join(shown) if shown else "no control analysed",
                effect_verdict(effect, [v for _, v in noise if v], null),
            )
        )
    return rows + exact_rows(src, base, aligned)


#: exact answer-distribution measures (`analysis=answers`): (label, key path under
#: models.<model>, or None for the pair's exact sequence-level γ; null of the comparison)
EXACT_MEASURES = (
    ("entropy over the candidates, nats: model − base", ("entropy_nats",), 0.0),
    ("KL(reference ‖ model) − KL(reference ‖ base), nats", ("kl_reference_to_model",), 0.0),
    ("candidates holding 90% of P: model − base", ("coverage_90",), 0.0),
    ("sequence-level γ over the candidates, exact fit", None, 1.0),
)


def exact_rows(src: Sources, base: str, aligned: str) -> list[tuple[str, str, str, str]]:
    """Effect against noise on an exact answer distribution (`analysis=answers` of the base's
    candidate archive, every model scored there): no sampling, so no interval; the effect is
    resolved when it departs from the null by more than every control's does."""
    found = own(src, "answers", base)
    if not found:
        return []
    models = src.cite(found, "models") or {}
    others = [m for m in sorted(models) if m not in (base, aligned)]
    what = (
        f"{src.cite(found, 'source') or 'answers'}, exact over "
        f"{src.cite(found, 'candidates')} candidates"
    )
    rows = []
    for label, path, null in EXACT_MEASURES:

        def get(m, path=path):
            if m not in models:
                return None
            if path is None:
                return src.cite(found, "pairs", f"{base} vs {m}", "gamma_sequence_level_exact")
            mine, theirs = (
                src.cite(found, "models", m, *path),
                src.cite(found, "models", base, *path),
            )
            return None if None in (mine, theirs) else mine - theirs

        effect = get(aligned)
        if effect is None:
            continue
        noise = [(m, get(m)) for m in others]
        noise = [(m, v) for m, v in noise if v is not None]
        digits = 0 if path == ("coverage_90",) else 3
        num = lambda v: f"{v:+.{digits}f}" if null == 0 else fmt(float(v), digits)  # noqa: E731
        # effect_verdict's rule on exact values (intervals of one point)
        verdict = effect_verdict((effect, [effect] * 2), [(v, [v] * 2) for _, v in noise], null)
        verdict = {
            "resolved": "resolved (exact: beyond every control's difference)",
            "not resolved": "not resolved (exact: within a control's)",
        }.get(verdict, "no control" if not noise else verdict)
        rows.append(
            (
                f"{what}: {label} (exact, no interval)",
                num(effect),
                "; ".join(f"{m}: {num(v)}" for m, v in noise) or "no control analysed",
                verdict,
            )
        )
    return rows


def controls(src: Sources, base: str, aligned: str) -> list[str]:
    """Other aligned models compared with the same base on its completions (the control)."""
    return sorted(
        {
            s["aligned"]
            for _, s in src.runs
            if s["analysis"] == "mitigation"
            and s.get("base") == base
            and s.get("generator") == base
            and s.get("aligned") not in (base, aligned)
        }
    )


def answer(
    src: Sources, base: str, aligned: str, where: str = "", lens: Sources | None = None
) -> list[str]:
    """ "Did alignment sharpen the model?" in three sentences, every number cited, all on the
    base model's own completions (both models on identical tokens): the entropy per step,
    the pooled power γ with its verdict beside the control's, and where in the network
    (the logit lens) or, without one, how much temperature undoes."""
    m = mitigation_on(src, base, base, aligned)
    if m is None:
        return []
    h_b, h_a = src.cite(m, "base_entropy_mean"), src.cite(m, "aligned_entropy_mean")
    g, g_ci = src.cite(m, "gamma_pooled", "gamma"), src.cite(m, "gamma_pooled", "ci95")
    n = src.cite(m, "n_completions")
    out = [
        f"On {n} completions of {base}{where} (both models read the identical tokens), "
        f"{aligned}'s "
        f"next-token entropy is {fmt(h_a)} nats per step against {fmt(h_b)} for {base} "
        f"({fmt(h_a - h_b if None not in (h_a, h_b) else None)} nats)."
    ]
    noise = []
    for c in controls(src, base, aligned):
        mc = mitigation_on(src, base, base, c)
        gc, gc_ci = src.cite(mc, "gamma_pooled", "gamma"), src.cite(mc, "gamma_pooled", "ci95")
        noise.append(f"{c} (control): γ = {ci(gc, gc_ci, 4)}, {verdict(gc_ci)}")
    out.append(
        f"Its distribution is {base}'s raised to a pooled per-step power γ = {ci(g, g_ci, 4)} "
        f"(95% CI), {verdict(g_ci)}"
        + (f"; beside it {'; '.join(noise)}." if noise else "; no control was analysed.")
    )
    lens = lens or src
    lay = own(lens, "layers", base)
    name = f"{base}~{aligned}"
    last = lens.cite(lay, "pairs", name, "gamma_last", "mean") if lay else None
    if last is not None:
        gm = lens.cite(lay, "pairs", name, "gamma", "mean")
        gm_ci = lens.cite(lay, "pairs", name, "gamma", "ci95")
        blocks = lens.cite(lay, "pairs", name, "layers_base")
        half = lens.cite(lay, "pairs", name, "half_kl_layer", "block_base")
        before = f"{ci(gm[-2], gm_ci[-2], 4)} at block {blocks[-2]}" if len(gm) > 1 else "undefined"
        n_lens = lens.cite(lay, "models", base, "n_completions")
        on = f", on {n_lens} completions of {base} {lens.label}" if lens is not src else ""
        out.append(
            f"Layer by layer (logit lens{on}), the two models' predictions reach half their "
            f"final divergence at block {fmt(half)} of "
            f"{lens.cite(lay, 'models', base, 'n_layers')}, while γ_l is {before} and "
            f"{ci(last, lens.cite(lay, 'pairs', name, 'gamma_last', 'ci95'), 4)} at the output."
        )
    else:
        t = src.cite(m, "t_entropy", "t")
        k1 = src.cite(m, "at_temperature", "1", "kl_base_aligned_mean")
        kt = src.cite(m, "at_temperature", "t_entropy", "kl_base_aligned_mean")
        out.append(
            f"Sampling {aligned} at T* = {ci(t, src.cite(m, 't_entropy', 'ci95'), 4)} restores "
            f"the entropy per step and moves KL({base} ‖ {aligned}) from {fmt(k1, 4)} to "
            f"{fmt(kt, 4)} nats per step."
        )
    return out


def layers_rows(src: Sources, base: str, aligned: str) -> list[tuple[str, str, str]]:
    """The logit lens over depth (analysis=layers), on the completions of each model: each
    model's prediction depth, and per layer-pair group with this base (the aligned model's
    first, then the others: the control) the half-KL layer and γ at the last pair."""
    runs = [own(src, "layers", m) for m in (base, aligned)]
    if not any(runs):
        return []

    def depth(r, m):
        d = ("models", m, "prediction_depth")
        mean = src.cite(r, *d, "mean")
        if mean is None:
            return "–"
        return (
            f"{ci(mean, src.cite(r, *d, 'ci95'), 2)}, median {fmt(src.cite(r, *d, 'median'), 1)}"
            f" (of {src.cite(r, 'models', m, 'n_layers')} blocks)"
        )

    def pair(r, name):
        if src.cite(r, "pairs", name, "pairing") is None:
            return "–"
        h = lambda *k: src.cite(r, "pairs", name, "half_kl_layer", *k)
        g = lambda *k: src.cite(r, "pairs", name, "gamma_last", *k)
        q = h("pair_ci95") or [None, None]
        half = (
            f"half-KL at block {h('block_base')} / {h('block_aligned')} (depth "
            f"{fmt(h('relative_depth_base'), 2)}) [pairs {fmt(q[0])}–{fmt(q[1])}]"
            if h("pair") is not None
            else "half-KL layer undefined"
        )
        return f"{half}; γ_last median {fmt(g('median'))}, mean {ci(g('mean'), g('ci95'))}"

    rows = [
        (
            f"layers: prediction depth of {m}, mean block [95% CI] (logit lens; first layer "
            "whose top-1 stays the output's), on the completions of each model",
            *(depth(r, m) if r else "–" for r in runs),
        )
        for m in (base, aligned)
    ]
    names = sorted(
        {n for r in runs if r for n, p in r[1].get("pairs", {}).items() if p["base"] == base},
        key=lambda n: (not n.endswith(f"~{aligned}"), n),
    )
    for name in names:
        rows.append(
            (
                f"layers, {name}: first layer pair whose KL(base_l ‖ aligned_l) reaches half "
                "the last pair's, block of base / aligned [95% CI of the pair]; γ at the last "
                "pair [95% CI], on the completions of each model",
                *(pair(r, name) if r else "–" for r in runs),
            )
        )
    return rows


def attractor_cells(src: Sources, models, key: str, describe) -> list[str]:
    """One table cell per model: `describe` of every variant under its attractor summary's
    `key` ("variants": a list; "influence": a dict whose "variants" are keyed by name)."""
    cells = []
    for m in models:
        a = own(src, "attractor", m)
        found = src.cite(a, key) if a else None
        items = found["variants"].values() if isinstance(found, dict) else (found or [])
        cells.append("; ".join(describe(v) for v in items) or "–")
    return cells


def attractor_curves(src: Sources, base: str, aligned: str, out: Path) -> list[str]:
    """Both models in one plot: the edit's influence I(t) on identical continuations when the
    attractor runs have it (counterpart groups), else the trajectory divergence."""
    runs = {m: own(src, "attractor", m) for m in (base, aligned)}
    infl = {m: src.cite(a, "influence") for m, a in runs.items() if a and a[1].get("influence")}
    fig, ax = plt.subplots(figsize=(6, 3.8))
    drawn = False
    for m, colour in ((base, "tab:blue"), (aligned, "tab:red")):
        a = runs[m]
        if infl:
            for v in (infl.get(m) or {}).get("variants", {}).values():
                y = np.maximum(np.array(v["kl_by_step"]), 1e-16)
                ax.plot(
                    np.arange(len(y)),
                    y,
                    c=colour,
                    marker=".",
                    label=f"{m}: half-life {fmt(v['half_life_steps'], 2)} steps",
                )
                ax.axhline(infl[m]["noise_floor"], c=colour, ls=":", lw=0.8)
                drawn = True
            continue
        curves = (
            (src.cite(a, "trajectory_divergence_by_step") or src.cite(a, "kl_by_step_since_edit"))
            if a
            else None
        )
        floors = (
            (
                src.cite(a, "trajectory_divergence_control_vs_control_by_step")
                or src.cite(a, "kl_control_vs_control_by_step")
            )
            if a
            else None
        )
        for name, cv in (curves or {}).items():
            t = sorted(cv, key=int)
            ax.plot(
                [int(k) for k in t],
                [cv[k] for k in t],
                c=colour,
                marker=".",
                label=f"{m}: perturbed vs control",
            )
            fl = (floors or {}).get(name, {})
            if fl:
                tf = sorted(fl, key=int)
                ax.plot(
                    [int(k) for k in tf],
                    [fl[k] for k in tf],
                    c=colour,
                    ls=":",
                    label=f"{m}: control vs control",
                )
            drawn = True
    if not drawn:
        plt.close(fig)
        return []
    ax.set_xlabel("steps since the edit")
    if infl:
        ax.set_yscale("log")
        ax.set_ylabel("I(t) = KL(edited ‖ control), same tokens (nats)")
        ax.set_title(
            "The edit's influence on identical continuations (dotted: codec noise floor)",
            fontsize=9,
        )
    else:
        ax.set_ylabel("mean KL (nats), step t of each continuation")
        ax.set_title(
            "Trajectory divergence after the edit (different contexts after step 0)", fontsize=9
        )
    ax.legend(fontsize=6)
    return save_figure(fig, out, "attractor_curves")


def story_figure(src: Sources, base: str, aligned: str, out: Path) -> list[str]:
    """The story in one figure, on the base model's own completions (every model read the
    identical tokens), from summary numbers only: the per-step branching factor exp(H) along
    the generation for every model scored there (Yang & Holtzman's view; log axis; bands:
    95% CI over completions), and KL(base ‖ model) by position for the aligned model and every
    other (the control) with a pair summary there (Qi et al.'s "where along the answer")."""
    e = own(src, "entropy", base)
    models = src.cite(e, "models") if e else None
    if not models:
        return []
    others = sorted(
        {
            s["aligned"]
            for _, s in src.runs
            if s["analysis"] == "pair" and s.get("base") == base and s.get("generator") == base
        },
        key=lambda k: (k != aligned, k),
    )
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    order = [base, aligned] + sorted(k for k in models if k not in (base, aligned))
    for i, key in enumerate(k for k in order if k in models):
        bf = src.cite(e, "models", key, "branching_factor_by_position")
        y = np.asarray(bf["mean"], np.float64)
        band = np.array([[np.nan if v is None else v for v in b] for b in bf.get("ci95", [])])
        x = np.arange(len(y))
        top.plot(x, y, c=f"C{i}", lw=1.2, label=key + (" (base)" if key == base else ""))
        if band.size:
            top.fill_between(x, band[:, 0], band[:, 1], color=f"C{i}", alpha=0.2, lw=0)
    top.set_yscale("log")
    top.set_ylabel("branching factor exp(H) per step\n(effective choices, log axis)")
    where = f" {src.label}" if src.label else ""
    top.set_title(
        f"Along the generation, on {base}'s own completions{where} (bands: 95% CI)", fontsize=10
    )
    top.legend(fontsize=7)
    drawn = False
    for i, key in enumerate(others):
        p = pair_on(src, base, base, key)
        kl = src.cite(p, "kl_by_position") or {}
        bands = src.cite(p, "kl_by_position_ci95") or {}
        t = sorted(kl, key=int)
        c = f"C{order.index(key) if key in order else i + len(order)}"
        bottom.plot([int(k) for k in t], [kl[k] for k in t], c=c, lw=1.2, label=f"{key}")
        tb = [k for k in t if k in bands and None not in bands[k]]
        if tb:
            bottom.fill_between(
                [int(k) for k in tb],
                [bands[k][0] for k in tb],
                [bands[k][1] for k in tb],
                color=c,
                alpha=0.2,
                lw=0,
            )
        drawn = True
    bottom.set_xlabel("generated step t (0 = the first token after the prompt)")
    bottom.set_ylabel(f"KL({base} ‖ model) at step t\n(nats)")
    if drawn:
        bottom.legend(fontsize=7)
    else:
        bottom.text(
            0.5,
            0.5,
            "no pair summary on these completions",
            ha="center",
            transform=bottom.transAxes,
        )
    fig.tight_layout()
    return save_figure(fig, out, "story")


#: completions of each archive shown in the report's token explorer pages, and the top-k
EXPLORER_SAMPLES, EXPLORER_TOPK = 4, 10


def explorer_pages(
    src: Sources,
    base: str,
    aligned: str,
    out: Path,
    kinds=("completions", "perturbation", "answers"),
    tag: str = "",
) -> list[dict]:
    """Token-explorer pages (`engine.explorer`: standalone HTML, every number from the
    kernels) of the first completions of each model's own archive, the other model's rows
    beside its own, of each model's candidate-answer archive (the exact distribution over
    every candidate, the other model's beside it), and of each perturbation archive, the
    generator after the edited prefix beside itself after the control prefix (`@counterpart`,
    same tokens: the edit's influence) when scored.  An archive no longer where its summary says is skipped."""
    from engine import explorer
    from engine.archive import Archive
    from engine.archive.format import COUNTERPART_SUFFIX

    wanted = []
    for m in (base, aligned):
        e = own(src, "entropy", m) or pair_on(src, m, base, aligned)
        if e and "completions" in kinds:
            wanted.append(
                ("completions", m, src.cite(e, "archive"), aligned if m == base else base)
            )
        an = own(src, "answers", m)
        if an and "answers" in kinds:
            wanted.append(("answers", m, src.cite(an, "archive"), aligned if m == base else base))
        at = own(src, "attractor", m)
        if at and "perturbation" in kinds:
            wanted.append(("perturbation", m, src.cite(at, "archive"), m + COUNTERPART_SUFFIX))
    pages = []
    for kind, m, path, other in wanted:
        if not path or not Path(path).is_file():
            continue
        with Archive(path) as a:
            second = other if other in a.models else None
            name = f"explorer_{tag}{kind}_{re.sub(r'[^A-Za-z0-9_-]', '_', m)}.html"
            chosen = None  # the first completions
            if kind == "perturbation":  # the first two after the control prefix and the edit
                n, per = explorer.available(a, [a.model(m)]), a.samples_per_prompt
                chosen = [i for i in (0, 1, per, per + 1) if i < n]
            info = explorer.write(
                a,
                out / name,
                samples=chosen,
                topk=EXPLORER_TOPK,
                base=m,
                aligned=second,
                overwrite=True,
                limit=EXPLORER_SAMPLES,
            )
        pages.append(
            {"kind": kind, "generator": m, "archive": str(path), "where": src.label, **info}
        )
    return pages


def figures_of(src: Sources, analysis: str, model: str, stems: tuple[str, ...]) -> list[str]:
    f = own(src, analysis, model)
    figs = src.cite(f, "figures") if f else None
    return [p for p in (figs or []) if p.endswith(".png") and Path(p).stem in stems]


def run(cfg, a, out: Path) -> dict:
    c = cfg.analysis
    src = Sources(list(c.runs), str(c.get("runs_label") or ""))
    held = Sources(list(c.heldout), str(c.get("heldout_label") or "")) if c.get("heldout") else None
    if held and held.label == src.label:
        raise EngineError(
            "report: analysis.heldout_label and analysis.runs_label must differ "
            f"(both {held.label!r}): each names its own effect table"
        )
    base, aligned = pick_models(src, c)
    rows = headline(src, base, aligned)
    main = held or src  # where the experiment's effect is measured: the held-out prompts
    sharpen = answer(main, base, aligned, f" {main.label}" if main.label else "", src)
    if not sharpen and held:  # the held-out runs lack the mitigation: the seed runs answer
        main = src
        sharpen = answer(src, base, aligned, f" {src.label}" if src.label else "")
    effects = [
        {"where": s_.label, "rows": r}
        for s_ in ([held] if held else []) + [src]
        if (r := effect_rows(s_, base, aligned))
    ]
    figs = {
        "the story: where along the generation the models differ": [],
        "entropy (each model's own completions; both models scored on them)": [],
        "diversity: t-SNE of sentence embeddings with k-means clusters": [],
        "pair: per-step γ and KL": [],
        "mitigation: can temperature undo the sharpening? (exact, stored logits)": [],
        "layers: the logit lens over depth and layer by layer": [],
        "attractor": [],
    }
    caption = {}  # figure -> whose completions it shows

    def add(section, paths, m):
        figs[section] += paths
        caption.update({p: f"on {m}'s own completions" for p in paths})

    for m in (base, aligned):
        add(
            "entropy (each model's own completions; both models scored on them)",
            figures_of(
                src,
                "entropy",
                m,
                ("top5_entropy_boxplot", "per_token_top5_probabilities", "entropy_vs_gamma"),
            ),
            m,
        )
        add(
            "diversity: t-SNE of sentence embeddings with k-means clusters",
            figures_of(src, "diversity", m, ("tsne_clusters",)),
            m,
        )
        p = pair_on(src, m, base, aligned)
        if p:
            add(
                "pair: per-step γ and KL",
                [x for x in src.cite(p, "figures") if x.endswith(".png")],
                m,
            )
        mi = mitigation_on(src, m, base, aligned)
        if mi:
            add(
                "mitigation: can temperature undo the sharpening? (exact, stored logits)",
                [x for x in src.cite(mi, "figures") if x.endswith(".png")],
                m,
            )
        la = own(src, "layers", m)
        if la:
            add(
                "layers: the logit lens over depth and layer by layer",
                [x for x in src.cite(la, "figures") if x.endswith(".png")],
                m,
            )
    story = story_figure(main, base, aligned, out)
    if not story and main is not src:
        main = src
        story = story_figure(src, base, aligned, out)
    figs["the story: where along the generation the models differ"] += [
        p for p in story if p.endswith(".png")
    ]
    caption.update(
        {p: f"every model on {base}'s completions {main.label}, from the summaries" for p in story}
    )
    drawn = attractor_curves(src, base, aligned, out)
    figs["attractor"] += [p for p in drawn if p.endswith(".png")]
    caption.update({p: "both models, from the attractor summaries" for p in drawn})
    for m in (base, aligned):
        add("attractor", figures_of(src, "attractor", m, ("probability_heatmap",)), m)
    pages = explorer_pages(src, base, aligned, out)
    if held:
        pages += explorer_pages(
            held, base, aligned, out, kinds=("completions", "answers"), tag="heldout_"
        )
    md, page = render(base, aligned, rows, figs, caption, out, sharpen, pages, effects)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(page, encoding="utf-8")
    write_json(
        out,
        "report.json",
        {
            "base": base,
            "aligned": aligned,
            "rows": rows,
            "answer": sharpen,
            "effects": effects,
            "explorer": pages,
            "cited": src.cited + (held.cited if held else []),
            "images": [p for ps in figs.values() for p in ps],
        },
    )
    return {
        "base": base,
        "aligned": aligned,
        "report": str(out / "report.html"),
        "report_md": str(out / "report.md"),
        "n_sources": len(src.runs),
        "rows": {r[0]: {"base": r[1], "aligned": r[2]} for r in rows},
        "answer": sharpen,
        "effects": {
            e["where"]: {r[0]: {"effect": r[1], "noise": r[2], "verdict": r[3]} for r in e["rows"]}
            for e in effects
        },
        "explorer": pages,
        "figures": story + drawn,
    }


QUESTION = "Did alignment sharpen the model?"


def explorer_lines(pages) -> list[tuple[str, str]]:
    """(link, description) per token-explorer page."""
    return [
        (
            Path(p["out"]).name,
            f"{p['kind']} of {p['generator']}{' ' + p['where'] if p.get('where') else ''}: "
            f"{p['samples']} completions, {p['steps']} steps, "
            f"{' vs '.join(p['models'])} ({p['bytes'] / 2**10:.0f} KiB)",
        )
        for p in pages
    ]


def effect_title(base: str, where: str) -> str:
    return f"Effect against noise{', ' + where if where else ''} (base: {base})"


EXPLORER_NOTE = (
    "Standalone pages (no server, no network): tokens coloured by p, entropy, KL, Δ log p or "
    "the token-shift class; hover or use the arrow keys for each model's top-k at that step. "
    "Perturbation pages lay the edited and the control continuation side by side by step; "
    "answers pages show each model's exact distribution over every candidate."
)


def render(
    base, aligned, rows, figs, caption, out: Path, sharpen=(), pages=(), effects=()
) -> tuple[str, str]:
    rel = lambda p: os.path.relpath(p, out)
    md = [
        f"# {aligned} vs {base}",
        "",
        "Each model generated its own completions and was scored on the other's (same tokens); "
        "every number below comes from a summary.json listed in report.json.",
        "",
    ]
    if sharpen:
        md += [f"## {QUESTION}", "", " ".join(sharpen), ""]
    for e in effects:
        md += [
            f"## {effect_title(base, e['where'])}",
            "",
            f"| measure | effect: {aligned} | noise: the controls | verdict |",
            "|---|---|---|---|",
            *(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in e["rows"]),
            "",
        ]
    if effects:
        md += ["## Each model on its own completions and on the other's", ""]
    md += [
        f"| metric | {base} (base) | {aligned} (aligned) |",
        "|---|---|---|",
    ]
    md += [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    if pages:
        md += ["", "## Token explorer", "", EXPLORER_NOTE, ""]
        md += [f"- [{link}]({link}): {what}" for link, what in explorer_lines(pages)]
    for title, paths in figs.items():
        if paths:
            md += ["", f"## {title}", ""] + [
                f"![{Path(p).stem}, {caption.get(p, '')}]({rel(p)})" for p in paths
            ]
    esc = html.escape
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>base vs aligned</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}figure{display:inline-block;width:49%;margin:0;vertical-align:top}"
        "figure.wide{width:99%}img{width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}"
        "td.yes{color:#1a7f37;font-weight:600}td.no{color:#6e7781}"
        "</style></head><body>",
        f"<h1>{esc(aligned)} vs {esc(base)}</h1>",
        "<p>Each model generated its own completions and was scored on the other's (same tokens). "
        "Every number comes from a summary.json listed in report.json.</p>",
        *([f"<h2>{esc(QUESTION)}</h2>", f"<p>{esc(' '.join(sharpen))}</p>"] if sharpen else []),
        *(
            line
            for e in effects
            for line in (
                f"<h2>{esc(effect_title(base, e['where']))}</h2>",
                f"<table><tr><th>measure</th><th>effect: {esc(aligned)}</th>"
                "<th>noise: the controls</th><th>verdict</th></tr>",
                *(
                    f"<tr><td>{esc(r[0])}</td><td>{esc(r[1])}</td><td>{esc(r[2])}</td>"
                    f"<td class='{'yes' if r[3].startswith('resolved') else 'no'}'>"
                    f"{esc(r[3])}</td></tr>"
                    for r in e["rows"]
                ),
                "</table>",
            )
        ),
        *(["<h2>Each model on its own completions and on the other's</h2>"] if effects else []),
        f"<table><tr><th>metric</th><th>{esc(base)} (base)</th><th>{esc(aligned)} (aligned)</th></tr>",
    ]
    page += [f"<tr><td>{esc(r[0])}</td><td>{esc(r[1])}</td><td>{esc(r[2])}</td></tr>" for r in rows]
    page.append("</table>")
    if pages:
        page += ["<h2>Token explorer</h2>", f"<p>{esc(EXPLORER_NOTE)}</p>", "<ul>"]
        page += [
            f"<li><a href='{esc(link)}'>{esc(link)}</a>: {esc(what)}</li>"
            for link, what in explorer_lines(pages)
        ]
        page.append("</ul>")
    for title, paths in figs.items():
        if paths:
            page.append(f"<h2>{esc(title)}</h2>")
            page += [
                f"<figure{' class=wide' if Path(p).stem.startswith('per_token') else ''}>"
                f"<img src='{esc(rel(p))}' alt='{esc(Path(p).stem)}'>"
                f"<figcaption>{esc(Path(p).stem)}, {esc(caption.get(p, ''))}</figcaption></figure>"
                for p in paths
            ]
    page.append("</body></html>")
    return "\n".join(md) + "\n", "\n".join(page)


ANALYSIS = Analysis(name="report", run=run, needs_archive=False)
