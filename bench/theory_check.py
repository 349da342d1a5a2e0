"""The theory check: do DPO twins trained on typicality-biased labels sharpen as predicted?

Verbalized Sampling (Zhang et al. 2025): with r = r_true + alpha * log pi_ref and KL strength
beta, the optimum is pi* ∝ pi_ref**gamma * exp(r_true / beta), gamma = 1 + alpha / beta (a
sequence-level power).  This script measures it with the engine, nothing planted:

1. the reference model samples the held-out prompts (`prompts=open_ended_heldout`, which
   training never saw) with full logits;
2. every twin (`python -m engine align ...` builds) is scored on those exact tokens;
3. the `pair` analysis gives, per twin, the pooled per-step gamma (bootstrap CI over
   completions) and the pooled sequence-level gamma (within-prompt slope of log pi_twin(y) on
   log pi_ref(y), CI over prompts), KL(ref || twin); `entropy` gives top-5 entropy;
4. summary.json and `gamma_vs_predicted.png` (measured against 1 + alpha/beta, identity line)
   under --out.  The alpha = 0 twin is the control: same data and training, coin-flip labels.

    python -m bench.theory_check --twins smollm2-135m-random-dpo,smollm2-135m-typical-dpo
    (a twin is a model config, or the name of any `engine align name=NAME` build)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from analyses.__main__ import run as run_analysis  # noqa: E402
from analyses.lib.common import write_json  # noqa: E402
from analyses.protocol import CONF as ANALYSES_CONF  # noqa: E402
from engine.commands import dump, score  # noqa: E402
from engine.config import CONF, options  # noqa: E402


def cfg_of(name: str, out: Path, *overrides):
    conf = ANALYSES_CONF if name == "analyses" else CONF
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={out}", *overrides])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default="smollm2-135m-instruct")
    ap.add_argument("--twins", default="smollm2-135m-random-dpo,smollm2-135m-typical-dpo")
    ap.add_argument("--prompts", default="open_ended_heldout")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="outputs/theory_check")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument(
        "--replot", action="store_true", help="redraw the figure from --out/summary.json"
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        print(figure(json.loads((out / "summary.json").read_text())["twins"], out))
        return
    twins = [t for t in args.twins.split(",") if t]
    archive = out / "heldout.h5"
    common = [f"progress={str(args.progress).lower()}"]
    t0 = time.perf_counter()
    dcfg = cfg_of(
        "dump",
        out,
        f"model={args.reference}",
        f"prompts={args.prompts}",
        f"n_samples={args.n_samples}",
        f"batch_size={args.n_samples}",
        f"max_new_tokens={args.max_new_tokens}",
        f"out={archive}",
        "overwrite=true",
        *common,
    )
    dump.run(dcfg)
    times = {"dump": time.perf_counter() - t0}
    for twin in twins:
        t = time.perf_counter()
        model = (
            [f"model={twin}"]
            if twin in options("model")
            else ["model=aligned", f"model.name={twin}"]
        )
        scfg = cfg_of("score", out, f"archive={archive}", *model, "overwrite=true", *common)
        score.run(scfg)
        times[f"score {twin}"] = time.perf_counter() - t
    ent = run_analysis(
        cfg_of("analyses", out / "entropy", "analysis=entropy", f"archive={archive}", *common)
    )
    rows = {}
    for twin in twins:
        pair = run_analysis(
            cfg_of(
                "analyses",
                out / f"pair-{twin}",
                "analysis=pair",
                f"archive={archive}",
                f"analysis.base={args.reference}",
                f"analysis.aligned={twin}",
                *common,
            )
        )
        al = json.loads(pair["aligned_provenance"]["alignment"])
        g = pair["gamma"]
        rows[twin] = {
            "alpha": al["alpha"],
            "beta": al["beta"],
            "predicted_gamma": 1 + al["alpha"] / al["beta"],
            "pooled_per_step_gamma": g["pooled"]["gamma"],
            "pooled_per_step_ci95": g["pooled"]["ci95"],
            "sequence_level_gamma": g["sequence_level_pooled"]["gamma"],
            "sequence_level_ci95": g["sequence_level_pooled"]["ci95"],
            "kl_ref_twin": pair["kl_base_aligned"]["mean"],
            "kl_ref_twin_stderr": pair["kl_base_aligned"]["stderr"],
            "top5_entropy_bits": ent["models"][twin]["top5_entropy_bits"],
            "training": {
                k: al.get(k) for k in ("n_pairs", "steps", "final_loss", "reward_accuracy")
            },
            "pair_summary": pair["summary"],
        }
    summary = {
        "reference": args.reference,
        "prompts": args.prompts,
        "n_samples": args.n_samples,
        "max_new_tokens": args.max_new_tokens,
        "archive": str(archive),
        "reference_top5_entropy_bits": ent["models"][args.reference]["top5_entropy_bits"],
        "twins": rows,
        "seconds": times,
        "entropy_summary": ent["summary"],
        "definition": "pooled per-step gamma: argmin over one gamma of the summed KL(twin || "
        "softmax(gamma log p_ref)) over all held-out steps (bootstrap over "
        "completions); sequence-level gamma: within-prompt OLS slope of "
        "log pi_twin(y) on log pi_ref(y) (bootstrap over prompts); the "
        "theory's gamma = 1 + alpha/beta is sequence-level",
    }
    summary["figure"] = figure(rows, out)
    write_json(out, "summary.json", summary)
    for twin, r in rows.items():
        print(
            f"{twin}: alpha {r['alpha']:g} beta {r['beta']:g} predicted {r['predicted_gamma']:.2f} | "
            f"per-step {r['pooled_per_step_gamma']:.4f} [{r['pooled_per_step_ci95'][0]:.4f}, "
            f"{r['pooled_per_step_ci95'][1]:.4f}] | sequence {r['sequence_level_gamma']:.3f} "
            f"[{r['sequence_level_ci95'][0]:.3f}, {r['sequence_level_ci95'][1]:.3f}] | KL {r['kl_ref_twin']:.4f}"
        )
    print(f"summary: {out / 'summary.json'}\nfigure: {summary['figure']}")


def figure(rows: dict, out: Path) -> str:
    """Left: measured against predicted gamma with the identity line.  Right: the same
    measurements as gamma - 1 on their own scale, where the intervals are visible."""
    fig, (ax, az) = plt.subplots(1, 2, figsize=(9.5, 4), gridspec_kw={"width_ratios": [1, 1.1]})
    preds = [r["predicted_gamma"] for r in rows.values()]
    hi = max(preds + [r["sequence_level_ci95"][1] for r in rows.values()] + [1.2]) * 1.05
    ax.plot([0.8, hi], [0.8, hi], c="grey", ls="--", lw=1, label="identity: measured = 1 + α/β")
    kinds = (
        ("pooled per-step γ", "pooled_per_step", "o"),
        ("sequence-level γ", "sequence_level", "s"),
    )
    names = list(rows)
    for i, (name, key, marker) in enumerate(kinds):
        for j, r in enumerate(rows.values()):
            g = r[f"{key}_gamma"]
            lo, up = r[f"{key}_ci95"]
            err = [[g - lo], [up - g]]
            ax.errorbar(
                [r["predicted_gamma"] + (i - 0.5) * 0.03],
                [g],
                yerr=err,
                fmt=marker,
                capsize=3,
                c=f"C{i}",
                label=name if j == 0 else None,
            )
            az.errorbar(
                [j + (i - 0.5) * 0.2],
                [g - 1],
                yerr=err,
                fmt=marker,
                capsize=4,
                c=f"C{i}",
                label=name if j == 0 else None,
            )
            if i == 0:
                ax.annotate(
                    f"α={r['alpha']:g}", (r["predicted_gamma"], 0.82), ha="center", fontsize=7
                )
    ax.set_xlabel("predicted γ = 1 + α/β")
    ax.set_ylabel("measured γ (95% CI)")
    ax.set_title("DPO twins on held-out prompts", fontsize=10)
    ax.legend(fontsize=7)
    az.axhline(0, c="grey", lw=1)
    az.set_xticks(
        range(len(names)),
        [
            f"α = {rows[n]['alpha']:g}\npredicted γ−1 = {rows[n]['predicted_gamma'] - 1:.2f}"
            for n in names
        ],
        fontsize=8,
    )
    az.set_xlim(-0.6, len(names) - 0.4)
    az.set_ylabel("measured γ − 1 (95% CI)")
    az.set_title("zoom: sharpening against the α = 0 control", fontsize=10)
    az.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "gamma_vs_predicted.png", dpi=150, bbox_inches="tight")
    fig.savefig(out / "gamma_vs_predicted.svg", bbox_inches="tight")
    plt.close(fig)
    return str(out / "gamma_vs_predicted.png")


if __name__ == "__main__":
    main()
