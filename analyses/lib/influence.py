"""How long an edit is remembered: its influence on identical continuation tokens.

A perturbation archive pairs every variant prompt (edit or fork) with its control prompt, and
`python -m engine score archive=P counterpart=true` teacher-forces the generator over every
continuation after the *other* prefix of its pair (group `<generator>@counterpart`).  For a
continuation y and step t, with both distributions on the same tokens y<t:

    I(t) = KL( p(. | edited prefix, y<t) || p(. | control prefix, y<t) )

(and the reverse KL and JS).  Edited continuations read the edited prefix in the generator's
own rows and the control prefix in the counterpart rows; control continuations the other
way round; both sets are pooled.  Identical contexts give I = 0: the floor is the codec's
noise (`noise_floor`), stated next to the curve.  Summaries: the step after which I stays
below a threshold (default 5 floors; censored when it never does), the area under I(t), a
half-life from a log-linear fit of the mean curve's decay, and Δ log p of the continuation
under the two prefixes.  The trajectory divergence of `analysis=attractor` (step t of two
different continuations) is not this: it compares different contexts after the first tokens.
"""

from __future__ import annotations

import numpy as np

import kernels as K
from analyses.lib.common import Bootstrap
from engine.archive import Archive, ModelView, codecs
from engine.archive.format import COUNTERPART_SUFFIX
from kernels import bootstrap_ci

#: nats: below this, KL values are float32 rounding of the kernel's sums.  KL(p || q) of two
#: rows of one context that differ only in the forwards' last bits is ~1e-10 in truth, but its
#: float32 terms p (log p - log q) cancel: measured up to 1.3e-6 (either sign) on tiny-random
#: fp32 rows on an Intel Xeon (AVX-512), so 1e-5 keeps a 7x margin
KL_RESOLUTION = 1e-5


def counterpart(a: Archive) -> ModelView | None:
    return a.models.get(a.generator + COUNTERPART_SUFFIX)


def noise_floor(a: Archive, views: list[ModelView]) -> float:
    """KL that codec rounding alone can produce between two rows of identical context: with
    each decoded logit within eps of the truth, the two rows' log-probabilities differ by at
    most 2 eps per entry, and KL <= (2 eps)**2 / 2 to second order.  eps is the codec's
    documented worst case at the largest |logit| of the first sample's rows."""
    n = int(a.samples()["length"][0])
    eps = 0.0
    for m in views:
        top = float(np.abs(m.rows(0, slice(0, n))).max()) if n else 0.0
        eps = max(eps, codecs.worst_case_error(m.codec, top))
    return 2.0 * eps * eps


def settle_step(curve: np.ndarray, threshold: float) -> float:
    """First step from which the curve stays below threshold; NaN (censored) if it ends above."""
    above = np.flatnonzero(curve >= threshold)
    if not above.size:
        return 0.0
    return float("nan") if above[-1] == len(curve) - 1 else float(above[-1] + 1)


def half_life(curve: np.ndarray, threshold: float) -> float:
    """ln 2 / decay rate of a log-linear fit to the curve where it is above threshold (at
    least 3 points); inf when it does not decay, NaN when there is too little to fit."""
    t = np.flatnonzero(curve > threshold)
    if t.size < 3:
        return float("nan")
    slope = np.polyfit(t, np.log(curve[t]), 1)[0]
    return float(np.log(2) / -slope) if slope < 0 else float("inf")


def ragged_mean(rows: list[np.ndarray]) -> np.ndarray:
    """Mean over continuations at each step, of those that reach it."""
    T = max((len(r) for r in rows), default=0)
    acc, cnt = np.zeros(T), np.zeros(T)
    for r in rows:
        acc[: len(r)] += r
        cnt[: len(r)] += 1
    return acc / np.maximum(cnt, 1)


def pair_curves(a: Archive, cp: ModelView, variant: int, control: int) -> dict:
    """Per continuation of one (variant, control) pair of prompts: I(t), reverse KL, JS, and
    the continuation's log-probabilities under the edited and the control prefix."""
    s, own, M = a.samples(), a.model(), a.samples_per_prompt
    out = {"kl": [], "kl_reverse": [], "js": [], "delta_logp": [], "edited": [], "pair": []}
    for prompt, edited_side_own in ((variant, True), (control, False)):
        for i in range(prompt * M, (prompt + 1) * M):
            n = int(s["length"][i])
            if n == 0:
                continue
            x_own, x_cp = own.rows(i, slice(0, n)), cp.rows(i, slice(0, n))
            p, q = (x_own, x_cp) if edited_side_own else (x_cp, x_own)  # p: edited prefix
            st = K.pair_stats(p, q, s["tokens"][i, :n])
            out["kl"].append(st.kl_pq)
            out["kl_reverse"].append(st.kl_qp)
            out["js"].append(st.js)
            out["delta_logp"].append(float(np.sum(st.logp_token - st.logq_token)))
            out["edited"].append(edited_side_own)
            out["pair"].append(i - prompt * M)  # j: continuation j of either prefix, one seed
    return out


def cluster_means(x: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot] means of `x` over resamples of whole groups (the unit of independence): the
    completion bootstrap `analyses.lib.common.Bootstrap` with groups for completions."""
    ids, g = np.unique(groups, return_inverse=True)
    sums = np.bincount(g, x, minlength=len(ids))[:, None]
    counts = np.bincount(g, minlength=len(ids)).astype(np.float64)[:, None]
    return Bootstrap(len(ids), n_boot, seed).ratio(sums, counts)[1][:, 0]


def area_stats(areas: list[float], pairs: list[int], n_boot: int, seed: int) -> dict:
    """The area under I(t) per continuation (nats x steps): mean, std, n, a 95% bootstrap
    interval of the mean, and the values with their seed pair j (what `vs_reference`
    resamples).  Continuation j after the edited prefix and continuation j after the control
    prefix share one seed, so their areas are dependent: the bootstrap resamples whole pairs."""
    x, j = np.asarray(areas, np.float64), np.asarray(pairs, np.int64)
    ci = None
    if len(np.unique(j)) > 1:
        boot = cluster_means(x, j, n_boot, seed)
        ci = [float(q) for q in np.quantile(boot, [0.025, 0.975])]
    return {
        "mean": float(x.mean()) if len(x) else float("nan"),
        "std": float(np.std(x, ddof=1)) if len(x) > 1 else float("nan"),
        "n": int(len(x)),
        "n_pairs": int(len(np.unique(j))),
        "ci95": ci,
        "values": x.tolist(),
        "pairs": j.tolist(),
    }


def vs_reference(this: dict, ref: dict, n_boot: int, seed: int) -> dict:
    """Per variant both influence summaries have (the same edit of the same parent index, one
    perturbation archive per model): the mean area under I(t) of this model's continuations
    minus the reference's, with a 95% percentile bootstrap interval resampling each model's
    seed pairs independently (different continuations of different parents: no pairing
    between the models; within a model the two continuations of one seed go together), and
    `resolved` where it excludes 0.  Each model perturbs its own parent text, so the interval
    is conditional on the parents: a control model's difference measures that noise."""
    out = {}
    for name, v in this["variants"].items():
        r = ref["variants"].get(name)
        if r is None:
            continue
        x, y = (np.asarray(z["area"]["values"], np.float64) for z in (v, r))
        jx, jy = (np.asarray(z["area"]["pairs"], np.int64) for z in (v, r))
        d = float(x.mean() - y.mean()) if len(x) and len(y) else float("nan")
        ci = None
        if len(np.unique(jx)) > 1 and len(np.unique(jy)) > 1:
            # independent draws for the two models: seeds seed and seed + 1
            diff = cluster_means(x, jx, n_boot, seed) - cluster_means(y, jy, n_boot, seed + 1)
            ci = [float(q) for q in np.quantile(diff, [0.025, 0.975])]
        out[name] = {
            "area": {
                "this": float(x.mean()) if len(x) else float("nan"),
                "reference": float(y.mean()) if len(y) else float("nan"),
                "delta": d,
                "ci95": ci,
                "resolved": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
                "n_this": int(len(x)),
                "n_reference": int(len(y)),
            }
        }
    return out


def summarise(c: dict, threshold: float, n_boot: int, seed: int) -> dict:
    kl = c["kl"]
    mean = ragged_mean(kl)
    T = len(mean)
    band = []
    for t in range(T):
        at = np.array([k[t] for k in kl if len(k) > t])
        band.append(
            list(bootstrap_ci(at, n_boot=n_boot, seed=seed)) if len(at) > 1 else [at[0], at[0]]
        )
    settle = np.array([settle_step(k, threshold) for k in kl])
    dlp = np.array(c["delta_logp"])
    edited = np.array(c["edited"])
    stat = lambda x: (
        {
            "mean": float(np.mean(x)),
            "std": float(np.std(x, ddof=1)) if len(x) > 1 else float("nan"),
            "n": int(len(x)),
        }
        if len(x)
        else {"mean": float("nan"), "std": float("nan"), "n": 0}
    )
    return {
        "kl_by_step": mean.tolist(),
        "kl_band95_by_step": band,
        "kl_reverse_by_step": ragged_mean(c["kl_reverse"]).tolist(),
        "js_by_step": ragged_mean(c["js"]).tolist(),
        "settle_step_mean_curve": settle_step(mean, threshold),
        "settle_step": {
            "median": float(np.nanmedian(settle)) if np.isfinite(settle).any() else float("nan"),
            "censored_share": float(np.mean(~np.isfinite(settle))),
            "n_continuations": int(len(settle)),
        },
        "area": area_stats([float(np.sum(k)) for k in kl], c["pair"], n_boot, seed),
        "half_life_steps": half_life(mean, threshold),
        "delta_logp_edited_continuations": stat(dlp[edited]),
        "delta_logp_control_continuations": stat(dlp[~edited]),
    }


def influence(a: Archive, lin: dict, floors: float, n_boot: int, seed: int) -> dict | None:
    """Influence summaries per variant prompt, or None without a counterpart group."""
    cp = counterpart(a)
    if cp is None:
        return None
    floor = noise_floor(a, [a.model(), cp])
    # fp32 rows: the kernels' float32 KL terms (|error| ~1e-7) and the sampler's KV-cached vs
    # teacher-forced numerics, not the codec, set the floor
    threshold = max(floors * floor, KL_RESOLUTION)
    out = {
        "noise_floor": floor,
        "threshold": threshold,
        "threshold_floors": floors,
        "counterpart_group": cp.key,
        "variants": {},
    }
    for v, name in enumerate(lin["variant"]):
        if name == "control":
            continue
        c = pair_curves(a, cp, v, int(lin["control_prompt"][v]))
        if c["kl"]:
            out["variants"][f"prompt {v} ({name}: {lin['edit'][v]})"] = summarise(
                c, threshold, n_boot, seed
            )
    return out
