"""Shared output helpers: one place decides where files go (the run's output dir)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import kernels as K  # noqa: E402


def write_json(out: Path, name: str, data: dict) -> Path:
    """Strict JSON: NaN and ±inf (an undefined statistic, e.g. the std of one value) are
    written as null, which every JSON parser reads (bare NaN is not JSON)."""
    path = out / name
    path.write_text(json.dumps(strict(data), indent=2, sort_keys=True, allow_nan=False))
    return path


def strict(x):
    """`x` with numpy scalars and arrays as plain Python and non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    if isinstance(x, np.ndarray):
        return strict(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_csv(out: Path, name: str, columns: dict[str, np.ndarray]) -> Path:
    path = out / name
    keys = list(columns)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for row in zip(*(np.asarray(columns[k]).tolist() for k in keys)):
            w.writerow(row)
    return path


def save_figure(fig, out: Path, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{stem}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(str(p))
    plt.close(fig)
    return paths


def mean_std(x) -> dict:
    x = np.asarray(x, np.float64)
    return {
        "mean": float(x.mean()) if x.size else float("nan"),
        "std": float(x.std(ddof=1)) if x.size > 1 else float("nan"),
    }


def finite_rows(r: dict, sample: np.ndarray, step: np.ndarray, field: str):
    """Drop rows whose `field` is NaN: the kernels give NaN for a stored row with NaN or +inf
    logits, or none finite (archives written by this engine hold none: `on_nonfinite`).
    Returns (r, sample, step, number skipped), the count for the summary."""
    keep = ~np.isnan(np.asarray(r[field], dtype=np.float64))
    return (
        {k: np.asarray(v)[keep] for k, v in r.items()},
        sample[keep],
        step[keep],
        int((~keep).sum()),
    )


def sweep_dirname(overrides: str) -> str:
    """A multirun job's folder name from its overrides (`hydra.job.override_dirname`), with
    archive paths shortened to their file stem and `analysis.` dropped from option keys:
    `aligned=twin,analysis=pair,archive=demo`."""
    parts = []
    for item in overrides.split(","):
        key, eq, value = item.partition("=")
        if eq and ("/" in value or value.endswith(".h5")):
            value = Path(value).stem
        key = key.removeprefix("analysis.") if key != "analysis" else key
        parts.append(f"{key}{eq}{value}".replace("/", "_"))
    return ",".join(parts) or "job"


def register_resolvers() -> None:
    """`${sweep_dirname:...}` for analyses/conf/analyses.yaml (registered once per process; every
    process that runs a job imports this module with the task function)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sweep_dirname"):
        OmegaConf.register_new_resolver("sweep_dirname", sweep_dirname)


register_resolvers()


class Bootstrap:
    """Resampling whole completions (the rows of one completion are dependent, so the
    completion is the unit): one multiplicity matrix [n_boot, n] (how often each completion is
    drawn in each resample, from `default_rng(seed).integers(0, n, (n_boot, n))`), shared by
    every statistic of one set of completions.  The one estimator behind every interval over
    completions: pair's KL (`completion_ci`), the bands by position (`position_bands`) and
    the layers analysis' curves."""

    def __init__(self, n: int, n_boot: int, seed: int):
        rng = np.random.default_rng(seed)
        self.n, self.n_boot = n, n_boot
        idx = rng.integers(0, max(n, 1), size=(n_boot, n))
        flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
        self.w = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)

    def ratio(self, sums: np.ndarray, counts: np.ndarray):
        """Point estimate sum(sums) / sum(counts) over completions [n, m] -> [m], the
        resamples' values [n_boot, m] and their 2.5 / 97.5% quantiles (NaN where a resample
        or the point has no count)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            point = sums.sum(0) / counts.sum(0)
            boot = (self.w @ sums) / (self.w @ counts)
        if self.n == 0 or self.n_boot == 0:
            nan = np.full(point.shape, np.nan)
            return point, boot, nan, nan
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: undefined
            lo, hi = np.nanquantile(boot, [0.025, 0.975], axis=0)
        return point, boot, lo, hi


def completion_ci(values, sample, n_boot: int, seed: int) -> list[float] | None:
    """95% percentile bootstrap interval of the mean over rows (`values`, one per row of
    completion `sample`), resampling whole completions; None with fewer than 2."""
    ids, s = np.unique(np.asarray(sample), return_inverse=True)
    if len(ids) < 2:
        return None
    values = np.asarray(values, np.float64)
    sums = np.bincount(s, values, minlength=len(ids))[:, None]
    counts = np.bincount(s, minlength=len(ids)).astype(np.float64)[:, None]
    _, _, lo, hi = Bootstrap(len(ids), n_boot, seed).ratio(sums, counts)
    return [float(lo[0]), float(hi[0])]


def position_bands(values, sample, step, n_boot: int = 1000, seed: int = 0) -> dict:
    """Per generated step t: the mean over completions of `values` (one per row, rows keyed by
    `sample` and `step`), how many completions reach t, and a 95% percentile bootstrap
    interval of that mean over completions (`Bootstrap`: whole completions resampled, the same
    draws at every step, so neighbouring steps' bands are comparable; None where fewer than 2
    reach t)."""
    values, sample, step = (np.asarray(x) for x in (values, sample, step))
    keep = np.isfinite(values)  # a non-finite row is no value: it neither counts nor spreads
    values, sample, step = values[keep], sample[keep], step[keep]
    if len(values) == 0:
        return {"mean": [], "n_completions": [], "ci95": []}
    ids, s = np.unique(sample, return_inverse=True)
    T = int(step.max()) + 1
    sums = np.zeros((len(ids), T))  # [completion, step]
    counts = np.zeros((len(ids), T))
    sums[s, step] = values
    counts[s, step] = 1.0
    n = counts.sum(0).astype(np.int64)
    mean, _, lo, hi = Bootstrap(len(ids), n_boot, seed).ratio(sums, counts)
    ok = n >= 2
    return {
        "mean": mean.tolist(),
        "n_completions": n.tolist(),
        "ci95": [[float(a), float(b)] if k else [None, None] for a, b, k in zip(lo, hi, ok)],
    }


def paired_over_prompts(this: dict, reference: dict, n_boot: int, seed: int) -> dict:
    """One per-prompt score of two models on the same prompts, each on its own completions
    (`this`, `reference`: prompt -> score): both means over the prompts where both are
    finite, their difference (this - reference) with a 95% percentile bootstrap interval over
    prompts, paired by prompt (`kernels.bootstrap_ci`), and `resolved` where it excludes 0."""
    shared = [p for p in this if p in reference]
    x = np.array([np.nan if this[p] is None else this[p] for p in shared], np.float64)
    y = np.array([np.nan if reference[p] is None else reference[p] for p in shared], np.float64)
    d = x - y
    ok = np.isfinite(d)
    if ok.sum() < 2:
        return {"delta": float("nan"), "ci95": [float("nan"), float("nan")], "n_prompts": 0}
    lo, hi = K.bootstrap_ci(d[ok], np.mean, n_boot=n_boot, seed=seed)
    return {
        "this": float(x[ok].mean()),
        "reference": float(y[ok].mean()),
        "delta": float(d[ok].mean()),
        "ci95": [lo, hi],
        "resolved": bool(lo > 0 or hi < 0),
        "n_prompts": int(ok.sum()),
    }
