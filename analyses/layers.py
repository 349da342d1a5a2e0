"""The logit lens over depth (format version 6): how each model's prediction forms layer by
layer, and where two models' predictions part.

Per model group with a lens (`/models/<key>/lens`, written by `dump`, `score` or `perturb`
with `lens=true`; "layer l" is the output of block l, read through the model's final norm and
unembedding, so the last block's row is the model's own output), at every selected layer
(the lens's `layers`, block indices):

- the mean over stored steps of the lens's entropy, of KL(final ‖ lens_l) (tuned-lens's
  `forward_kl`: the divergence of the model's own output from the lens, 0 at the last block),
  of log lens_l(stored token), and the share of steps whose lens top-1 is the final top-1;
- the prediction depth per step (Baldock et al. 2021, "Deep learning through the lens of
  example difficulty", applied to the logit lens): the first selected layer from which the
  lens's top-1 equals the final top-1 at every later selected layer.  With a stride it is
  resolved only to the stride.

Per layer-pair group (`/layer_pairs/<base>~<aligned>`, `python -m engine layers`: the two
models teacher-forced on the same tokens, pair j = block layers_base[j] of the base with block
layers_aligned[j] of the aligned model): the mean KL(base_l ‖ aligned_l), its reverse, JS and
KL at gamma; gamma_l (argmin_g KL(aligned_l ‖ base_l^g)): the median over steps where it is
identified and the pooled mean; the half-KL layer (the first pair whose mean KL reaches half
the last pair's); a layer × position heatmap of the mean KL.

Every mean is over valid steps (sample < n_complete of the group and of the archive, step <
the sample's length; the rest is padding and never read as data); its 95% interval is a
percentile bootstrap over completions (whole samples resampled, `n_boot`, `seed`): each
resample's value is the sum over its completions' steps over their number of steps.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from analyses.lib.common import Bootstrap, save_figure
from analyses.protocol import Analysis
from engine.archive import Archive
from engine.archive import format as F
from engine.errors import EngineError

#: completions read at a time (one slab [block, steps, layers] per statistic)
BLOCK = 64
#: the lens's per-layer means, with the figure's axis label
LENS_CURVES = {
    "entropy": "entropy of lens_l (nats)",
    "kl_final": "KL(final ‖ lens_l) (nats)",
    "logp_token": "log lens_l(stored token) (nats)",
    "top1_agreement": "share of steps with lens top-1 = final top-1",
}
#: the layer pairs' per-pair means (gamma apart)
PAIR_CURVES = ("kl_base_aligned", "kl_aligned_base", "js", "kl_at_gamma")

NO_DATA = (
    "{path} has no logit-lens data (no /models/<key>/lens, no /layer_pairs): record a model's "
    "lens with `python -m engine dump ... lens=true` or `python -m engine score ... lens=true`, "
    "and compare two models layer by layer with `python -m engine layers archive=... "
    "model@base=... model@aligned=...`"
)
DEPTH_NOTE = (
    "prediction depth: per step, the first selected layer (the lens's `layers`, block "
    "indices) from which the lens top-1 equals the final top-1 at every later selected "
    "layer (Baldock et al. 2021 on the logit lens); measured over the selected layers only, "
    "so with a stride it is resolved only to the stride"
)
BOOT_NOTE = (
    "ci95: 95% percentile bootstrap over completions (whole samples resampled, n_boot times, "
    "fixed seed); each value is the mean over the resampled completions' valid steps"
)


def stem(name: str) -> str:
    """A file-name-safe form of a model key or pair name (`~` becomes `__`)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name.replace(F.LAYER_PAIR_SEP, "__"))


def num(x, digits=3) -> str:
    """x formatted, or "–" where undefined (None, NaN)."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def floats(x) -> list:
    return [float(v) for v in np.asarray(x, np.float64).ravel()]


@contextlib.contextmanager
def _quiet():
    """numpy's warnings of an all-NaN column (a statistic undefined there: NaN) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def band(point, lo, hi) -> dict:
    return {"mean": floats(point), "ci95": [[a, b] for a, b in zip(floats(lo), floats(hi))]}


def blocks(lengths: np.ndarray):
    """(i0, i1, valid [b, t]) over the completions in blocks of BLOCK: valid marks t < length."""
    for i0 in range(0, len(lengths), BLOCK):
        i1 = min(len(lengths), i0 + BLOCK)
        tmax = int(lengths[i0:i1].max(initial=0))
        if tmax > 0:
            yield i0, i1, np.arange(tmax)[None, :] < lengths[i0:i1, None]


def valid_lengths(a: Archive, n_group: int) -> np.ndarray:
    """Lengths of samples 0 .. min(archive's, group's n_complete) - 1."""
    n = min(a.n_complete, n_group)
    return np.asarray(a.samples()["length"][:n], dtype=np.int64)


def sums_counts(x: np.ndarray, valid: np.ndarray):
    """Per completion [b, m]: sum and number of the finite values of x [b, t, m] at valid t."""
    ok = valid[..., None] & np.isfinite(x)
    return np.where(ok, x, 0.0).sum(1), ok.sum(1).astype(np.float64)


# ---- one model's lens -------------------------------------------------------------------------
def lens_model(a: Archive, key: str, c) -> dict:
    m = a.model(key)
    lv = m.lens
    layers = lv.layers
    L = len(layers)
    lengths = valid_lengths(a, m.n_complete)
    n = len(lengths)
    sums = {k: np.zeros((n, L)) for k in LENS_CURVES}
    counts = {k: np.zeros((n, L)) for k in LENS_CURVES}
    depth_sum, depth_n = np.zeros((n, 1)), np.zeros((n, 1))
    hist = np.zeros(L, np.int64)
    undefined = 0
    for i0, i1, valid in blocks(lengths):
        t = valid.shape[1]
        for name in ("entropy", "kl_final", "logp_token"):
            x = lv[name][i0:i1, :t].astype(np.float64)
            sums[name][i0:i1], counts[name][i0:i1] = sums_counts(x, valid)
        top1 = lv["rank_final_top"][i0:i1, :t] == 1  # [b, t, L]
        v = valid[..., None]
        sums["top1_agreement"][i0:i1] = (top1 & v).sum(1)
        counts["top1_agreement"][i0:i1] = np.broadcast_to(v, top1.shape).sum(1)
        # stays[..., j]: top-1 agrees at every selected layer j .. L-1; depth = the first such j
        stays = np.flip(np.logical_and.accumulate(np.flip(top1, -1), axis=-1), -1)
        n_stay = stays.sum(-1)
        defined = valid & (n_stay > 0)  # the last layer disagreeing (a tie): no depth
        j = np.minimum(L - n_stay, L - 1)
        depth_sum[i0:i1, 0] = np.where(defined, layers[j], 0).sum(1)
        depth_n[i0:i1, 0] = defined.sum(1)
        hist += np.bincount(j[defined], minlength=L)[:L]
        undefined += int((valid & ~defined).sum())
    keep = lengths > 0  # completions with at least one step: the bootstrap's units
    boot = Bootstrap(int(keep.sum()), int(c.n_boot), int(c.seed))
    out = {
        "layers": [int(x) for x in layers],
        "n_layers": lv.n_layers,
        "relative_depth": floats((layers + 1) / lv.n_layers),
        "k": lv.k,
        "convention": lv.convention,
        "check": None if lv.check is None else {k: float(v) for k, v in lv.check.items()},
        "n_completions": int(keep.sum()),
        "n_steps": int(lengths.sum()),
    }
    for name in LENS_CURVES:
        point, _, lo, hi = boot.ratio(sums[name][keep], counts[name][keep])
        out[name] = band(point, lo, hi)
        if name != "top1_agreement":
            out[name]["n_nonfinite"] = int(lengths.sum() * L - counts[name].sum())
    mid = int(np.argmin(np.abs(layers - (lv.n_layers - 1) / 2)))
    out["kl_final_mid"] = {
        "layer": int(layers[mid]),
        "relative_depth": float((layers[mid] + 1) / lv.n_layers),
        "mean": out["kl_final"]["mean"][mid],
        "ci95": out["kl_final"]["ci95"][mid],
    }
    point, _, lo, hi = boot.ratio(depth_sum[keep], depth_n[keep])
    out["prediction_depth"] = {
        "mean": float(point[0]),
        "ci95": [float(lo[0]), float(hi[0])],
        "median": float(np.median(np.repeat(layers, hist))) if hist.sum() else float("nan"),
        "histogram": {"layers": [int(x) for x in layers], "counts": hist.tolist()},
        "n_steps": int(hist.sum()),
        "n_undefined": undefined,
        "note": DEPTH_NOTE,
    }
    return out


# ---- two models' layer pairs ------------------------------------------------------------------
def first_half(curves: np.ndarray) -> np.ndarray:
    """Per curve [..., P]: the first pair index whose value reaches half the last pair's;
    -1 where the last value is not a positive number."""
    last = curves[..., -1]
    with np.errstate(invalid="ignore"):
        reach = curves >= (last / 2)[..., None]
    idx = np.argmax(reach, axis=-1)
    return np.where(np.isfinite(last) & (last > 0), idx, -1)


def layer_pair(a: Archive, name: str, c) -> tuple[dict, np.ndarray]:
    """The summary of one layer-pair group and its heatmap [P, T] (mean KL(base_l ‖ aligned_l)
    over completions, per pair and step; NaN where no completion reaches the step)."""
    pv = a.layer_pairs[name]
    lb, la = pv.layers_base, pv.layers_aligned
    P = len(lb)
    lengths = valid_lengths(a, pv.n_complete)
    n, T = len(lengths), int(lengths.max(initial=0))
    names = (*PAIR_CURVES, "gamma")
    sums = {k: np.zeros((n, P)) for k in names}
    counts = {k: np.zeros((n, P)) for k in names}
    heat_sum, heat_n = np.zeros((T, P)), np.zeros((T, P))
    gammas = []
    for i0, i1, valid in blocks(lengths):
        t = valid.shape[1]
        for k in names:
            x = pv[k][i0:i1, :t].astype(np.float64)
            sums[k][i0:i1], counts[k][i0:i1] = sums_counts(x, valid)
            if k == "kl_base_aligned":
                ok = valid[..., None] & np.isfinite(x)
                heat_sum[:t] += np.where(ok, x, 0.0).sum(0)
                heat_n[:t] += ok.sum(0)
            if k == "gamma":
                gammas.append(x[valid].astype(np.float32))  # [rows, P], NaN: unidentified
    keep = lengths > 0
    boot = Bootstrap(int(keep.sum()), int(c.n_boot), int(c.seed))
    out = {
        "base": pv.base,
        "aligned": pv.aligned,
        "pairing": pv.pairing,
        "layers_base": lb.tolist(),
        "layers_aligned": la.tolist(),
        "depth_base": pv.depth_base,
        "depth_aligned": pv.depth_aligned,
        "relative_depth_base": floats((lb + 1) / pv.depth_base),
        "relative_depth_aligned": floats((la + 1) / pv.depth_aligned),
        "n_completions": int(keep.sum()),
        "n_steps": int(lengths.sum()),
    }
    boots = {}
    for k in PAIR_CURVES:
        point, boots[k], lo, hi = boot.ratio(sums[k][keep], counts[k][keep])
        out[k] = band(point, lo, hi)
    g = np.concatenate(gammas) if gammas else np.empty((0, P))
    point, _, lo, hi = boot.ratio(sums["gamma"][keep], counts["gamma"][keep])
    with _quiet():
        median = np.nanmedian(g, axis=0) if len(g) else np.full(P, np.nan)
    out["gamma"] = {
        "median": floats(median),
        **band(point, lo, hi),
        "n_identified": [int(x) for x in counts["gamma"].sum(0)],
    }
    out["gamma_last"] = {
        "pair": P - 1,
        "block_base": int(lb[-1]),
        "block_aligned": int(la[-1]),
        "median": out["gamma"]["median"][-1],
        "mean": out["gamma"]["mean"][-1],
        "ci95": out["gamma"]["ci95"][-1],
        "n_identified": out["gamma"]["n_identified"][-1],
    }
    out["half_kl_layer"] = half_kl(out, boots["kl_base_aligned"])
    with np.errstate(invalid="ignore", divide="ignore"):
        heat = (heat_sum / heat_n).T  # [P, T]
    return out, heat


def half_kl(s: dict, boot_curves: np.ndarray) -> dict:
    """The first pair whose mean KL(base_l ‖ aligned_l) reaches half the last pair's, with the
    2.5 / 97.5% quantiles of that pair index over the bootstrap's resamples."""
    curve = np.asarray(s["kl_base_aligned"]["mean"], np.float64)
    j = int(first_half(curve))
    b = first_half(boot_curves)
    b = b[b >= 0]
    q = (
        [int(x) for x in np.quantile(b, [0.025, 0.975], method="inverted_cdf")]
        if b.size
        else [None, None]
    )

    def at(key, idx):
        return None if idx is None or idx < 0 else s[key][idx]

    return {
        "pair": j if j >= 0 else None,
        "block_base": at("layers_base", j),
        "block_aligned": at("layers_aligned", j),
        "relative_depth_base": at("relative_depth_base", j),
        "relative_depth_aligned": at("relative_depth_aligned", j),
        "threshold": float(curve[-1] / 2),
        "kl_last": float(curve[-1]),
        "pair_ci95": q,
        "block_base_ci95": [at("layers_base", x) for x in q],
        "block_aligned_ci95": [at("layers_aligned", x) for x in q],
        "relative_depth_base_ci95": [at("relative_depth_base", x) for x in q],
        "n_resamples": int(b.size),
        "reason": None if j >= 0 else "the last pair's mean KL is not positive",
    }


def heatmap_entry(heat: np.ndarray, c) -> dict:
    P, T = heat.shape
    small = P * T <= int(c.heatmap_cells)
    digits = int(c.heatmap_digits)
    return {
        "shape": [P, T],
        "matrix": [[round(float(v), digits) for v in row] for row in heat] if small else None,
        "in_summary": small,
    }


# ---- the run ------------------------------------------------------------------------------
def run(cfg, a: Archive, out: Path) -> dict:
    c = cfg.analysis
    lensed = [k for k, m in a.models.items() if m.lens is not None]
    pairs = sorted(a.layer_pairs)
    if not lensed and not pairs:
        raise EngineError(NO_DATA.format(path=a.path))
    summary = {"models": {}, "pairs": {}, "pairs_by_base": {}, "bootstrap": BOOT_NOTE}
    figures = []
    for key in lensed:
        s = lens_model(a, key, c)
        s["figure"] = lens_figure(key, s, out)
        figures += s["figure"]
        summary["models"][key] = s
    for name in pairs:
        s, heat = layer_pair(a, name, c)
        s["heatmap"] = heatmap_entry(heat, c)
        s["heatmap"]["figure"] = heatmap_figure(name, s, heat, out)
        figures += s["heatmap"]["figure"]
        summary["pairs"][name] = s
        summary["pairs_by_base"].setdefault(s["base"], []).append(name)
    if pairs:
        figures += pairs_figure(summary["pairs"], out)
    summary["figures"] = figures
    return summary


# ---- figures ------------------------------------------------------------------------------
def lens_figure(key: str, s: dict, out: Path) -> list[str]:
    """Entropy, KL to the final output and top-1 agreement over block index, with bands."""
    x = np.asarray(s["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, name, colour in zip(
        axes, ("entropy", "kl_final", "top1_agreement"), ("tab:blue", "tab:purple", "tab:green")
    ):
        y = np.asarray(s[name]["mean"], np.float64)
        ci = np.asarray(s[name]["ci95"], np.float64)
        ax.plot(x, y, marker=".", color=colour, label="mean over steps")
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=colour, alpha=0.25, label="95% CI")
        ax.set_xlabel(f"block index l (of {s['n_layers']})")
        ax.set_ylabel(LENS_CURVES[name], fontsize=9)
    d = s["prediction_depth"]
    if d["mean"] is not None and np.isfinite(d["mean"]):
        axes[2].axvline(
            d["mean"], color="k", ls=":", label=f"mean prediction depth {d['mean']:.2f}"
        )
    axes[2].set_ylim(-0.03, 1.03)
    axes[0].set_title("Entropy of the lens", fontsize=10)
    axes[1].set_title("KL to the model's own output", fontsize=10)
    axes[2].set_title("Top-1 agreement with the output", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Logit lens of {key}: {s['n_completions']} completions, {s['n_steps']} steps "
        "(bands: 95% CI over completions)",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, out, f"layers_lens_{stem(key)}")


def pairs_figure(pairs: dict, out: Path) -> list[str]:
    """KL(base_l ‖ aligned_l) and gamma_l over relative depth, one line per pair group (the
    control beside the twin), with bands; gamma = 1 dashed."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    means = [np.asarray(s["kl_base_aligned"]["mean"], np.float64) for s in pairs.values()]
    log = all(np.all(m[np.isfinite(m)] > 0) for m in means) and any(
        np.isfinite(m).any() for m in means
    )
    for i, (name, s) in enumerate(pairs.items()):
        colour = colours[i % len(colours)]
        x = np.asarray(s["relative_depth_base"])
        label = f"{name} ({s['pairing']} pairing)"
        y = np.asarray(s["kl_base_aligned"]["mean"], np.float64)
        ci = np.asarray(s["kl_base_aligned"]["ci95"], np.float64)
        top.plot(x, y, marker=".", color=colour, label=label)
        top.fill_between(x, ci[:, 0], ci[:, 1], color=colour, alpha=0.25)
        h = s["half_kl_layer"]
        if h["pair"] is not None:
            top.plot(
                x[h["pair"]],
                y[h["pair"]],
                "o",
                mfc="none",
                ms=9,
                color=colour,
                label=f"half-KL layer: block {h['block_base']} of the base",
            )
        g = s["gamma"]
        gm = np.asarray(g["mean"], np.float64)
        gci = np.asarray(g["ci95"], np.float64)
        bottom.plot(x, g["median"], marker=".", color=colour, label=f"{name}: median")
        bottom.plot(x, gm, ls="-.", color=colour, lw=1, label=f"{name}: mean, 95% CI")
        bottom.fill_between(x, gci[:, 0], gci[:, 1], color=colour, alpha=0.2)
    if log:
        top.set_yscale("log")
    top.set_ylabel("mean KL(base_l ‖ aligned_l) per step (nats" + (", log)" if log else ")"))
    top.set_title(
        "Divergence of the two lenses, layer by layer (95% CI over completions)", fontsize=10
    )
    top.legend(fontsize=7)
    bottom.axhline(1.0, color="grey", ls="--", lw=1, label="γ = 1 (no sharpening)")
    bottom.set_ylabel("γ_l = argmin_g KL(aligned_l ‖ base_l^g)")
    bottom.set_xlabel("relative depth of the base block, (l + 1) / number of blocks")
    bottom.set_title("Per-step power γ_l (identified steps)", fontsize=10)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, "layers_pairs")


def heatmap_figure(name: str, s: dict, heat: np.ndarray, out: Path) -> list[str]:
    """Mean KL(base_l ‖ aligned_l) per (layer pair, generated step); grey: no completion."""
    from matplotlib.colors import LogNorm

    P, T = heat.shape
    fig, ax = plt.subplots(figsize=(min(14, 4 + 0.12 * T), min(10, 2.5 + 0.25 * P)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    pos = heat[np.isfinite(heat) & (heat > 0)]
    norm = None
    if pos.size and np.isfinite(heat).sum() == pos.size and pos.max() > 100 * pos.min():
        norm = LogNorm(vmin=pos.min(), vmax=pos.max())
    im = ax.imshow(
        np.ma.masked_invalid(heat),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=cmap,
        norm=norm,
    )
    every = max(1, -(-P // 16))
    ticks = np.arange(0, P, every)
    same = s["layers_base"] == s["layers_aligned"]
    ax.set_yticks(
        ticks,
        [
            str(s["layers_base"][j])
            if same
            else f"{s['layers_base'][j]} / {s['layers_aligned'][j]}"
            for j in ticks
        ],
    )
    ax.set_ylabel("block index l" + ("" if same else " (base / aligned)"))
    ax.set_xlabel("generated step t (0 = first token after the prompt)")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("mean KL(base_l ‖ aligned_l) (nats)" + (", log colour" if norm else ""))
    ax.set_title(f"{name}: KL by layer and position (grey: no completion)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, f"layers_heatmap_{stem(name)}")


def terminal_lines(s: dict) -> list[str]:
    """The numbers printed at the end of a run."""
    lines = []
    for key, m in s.get("models", {}).items():
        d, k = m["prediction_depth"], m["kl_final_mid"]
        lines.append(
            f"{key}: prediction depth mean block {num(d['mean'], 2)} "
            f"[{num(d['ci95'][0], 2)}, {num(d['ci95'][1], 2)}] (median {num(d['median'], 1)}, "
            f"{m['n_layers']} blocks); KL to final at block {k['layer']} (mid depth) "
            f"{num(k['mean'], 4)} nats"
        )
    for name, p in s.get("pairs", {}).items():
        h, g = p["half_kl_layer"], p["gamma_last"]
        half = (
            f"half-KL at pair {h['pair']} (blocks {h['block_base']}/{h['block_aligned']}, "
            f"depth {num(h['relative_depth_base'], 2)}; pairs {h['pair_ci95'][0]}–"
            f"{h['pair_ci95'][1]})"
            if h["pair"] is not None
            else f"half-KL layer undefined ({h['reason']})"
        )
        lines.append(
            f"{name} ({p['pairing']}): {half}; gamma at the last pair median "
            f"{num(g['median'])}, mean {num(g['mean'])} [{num(g['ci95'][0])}, {num(g['ci95'][1])}]"
        )
    return lines


ANALYSIS = Analysis(name="layers", run=run, terminal_lines=terminal_lines)
