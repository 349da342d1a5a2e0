"""Where in the network does alignment change the distribution?  The logit lens over the
reference, its typicality twin and the alpha = 0 control, on identical tokens.

1. cost (--cost): one process, one loaded model, the same prompts, samples and seeds: `dump`
   and `score` with lens=false, lens_layers=stride:4 and lens_layers=all, best of --repeat;
   times exclude model loading; ratios to lens=false;
2. the measurement: the reference samples the held-out prompts (`open_ended_heldout`, never
   trained on) with lens=true; each twin is scored on them with lens=true; `python -m engine
   layers` pairs the reference with each twin (KL, JS and gamma per layer); `analysis=layers`
   summarises (bands: bootstrap over completions).
Each step is skipped when its output exists (rerun to resume).

    python -m bench.lens_check [--n-samples 1 --max-new-tokens 32 --out outputs/lens_check] [--cost]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from bench.theory_check import cfg_of
from engine.archive import Archive


def cost(args, out: Path) -> dict:
    """Seconds of dump and score with the lens off, at a stride of 4 and at every block."""
    from engine.commands import dump, score
    from engine.runtime import run as R
    from engine.runtime.settings import ModelSpec, RunSettings

    base = [f"model={args.reference}", "prompts=open_ended_heldout", "progress=false"]
    size = [f"n_samples={args.cost_samples}", f"max_new_tokens={args.max_new_tokens}"]
    cfg0 = cfg_of("dump", out, *base, *size)
    lm = R.load(ModelSpec.from_node(cfg0.model), RunSettings.from_cfg(cfg0))
    again = dataclasses.replace(lm, key="again")  # the same model, scored as another group
    prompts = f"prompts.texts={json.dumps(list(cfg0.prompts.texts)[: args.cost_prompts])}"
    rows = {}
    for name, lens in (
        ("off", []),
        ("stride:4", ["lens=true", "lens_layers=stride:4"]),
        ("all", ["lens=true"]),
    ):
        best = {"dump": float("inf"), "score": float("inf")}
        for r in range(args.repeat):
            path = out / "cost" / f"{name.replace(':', '')}-{r}.h5"
            cfg = cfg_of("dump", out, *base, *size, prompts, f"out={path}", "overwrite=true", *lens)
            t = time.perf_counter()
            dump.run(cfg, model=lm)
            best["dump"] = min(best["dump"], time.perf_counter() - t)
            scfg = cfg_of(
                "score",
                out,
                f"archive={path}",
                f"model={args.reference}",
                "model.key=again",
                "progress=false",
                *lens,
            )
            t = time.perf_counter()
            score.run(scfg, model=again)
            best["score"] = min(best["score"], time.perf_counter() - t)
            path.unlink()
        rows[name] = best
    for name in rows:
        for verb in ("dump", "score"):
            rows[name][f"{verb}_ratio"] = rows[name][verb] / rows["off"][verb]
    return {
        "prompts": args.cost_prompts,
        "samples_per_prompt": args.cost_samples,
        "max_new_tokens": args.max_new_tokens,
        "repeat": args.repeat,
        "seconds": rows,
    }


def measure(args, out: Path) -> dict:
    from analyses.__main__ import run as run_analysis
    from engine.commands import dump, layers, score

    archive = out / "heldout.h5"
    if not archive.exists():
        dump.run(
            cfg_of(
                "dump",
                out,
                f"model={args.reference}",
                "prompts=open_ended_heldout",
                f"n_samples={args.n_samples}",
                f"max_new_tokens={args.max_new_tokens}",
                "lens=true",
                f"out={archive}",
                f"resume={Path(str(archive) + '.partial').exists()}",
                f"progress={args.progress}",
            )
        )
    twins = [t for t in args.twins.split(",") if t]
    for twin in twins:
        with Archive(archive) as a:
            done = twin in a.models and a.models[twin].complete
            paired = any(lp.aligned == twin and lp.complete for lp in a.layer_pairs.values())
        if not done:
            score.run(
                cfg_of(
                    "score",
                    out,
                    f"archive={archive}",
                    f"model={twin}",
                    "lens=true",
                    "resume=true",
                    f"progress={args.progress}",
                )
            )
        if not paired:
            layers.run(
                cfg_of(
                    "layers",
                    out,
                    f"archive={archive}",
                    f"model@base={args.reference}",
                    f"model@aligned={twin}",
                    "resume=true",
                    f"progress={args.progress}",
                )
            )
    summary = run_analysis(
        cfg_of("analyses", out / "layers", f"archive={archive}", "analysis=layers")
    )
    return {
        "archive": str(archive),
        "summary": str(out / "layers" / "summary.json"),
        "layers": summary,
    }


def table(summary: dict, blocks=(0, 9, 18, 19, 20, 24, 28, 29)) -> str:
    """The measurement as text: per model its prediction depth; per layer pair the mean
    KL(base_l || aligned_l) and gamma_l at some blocks, with 95% intervals over completions,
    and the half-KL layer."""
    f = lambda x: "–" if x is None else f"{x:.4g}"  # noqa: E731
    ci = lambda m, c: f"{f(m)} [{f(c[0])}, {f(c[1])}]"  # noqa: E731
    lines = ["prediction depth (first block whose lens top-1 stays the output's), mean [95% CI]:"]
    for key, m in summary["models"].items():
        d = m["prediction_depth"]
        lines.append(
            f"  {key}: {ci(d['mean'], d['ci95'])}, median {f(d['median'])} of {m['n_layers']} blocks"
        )
    for name, p in summary["pairs"].items():
        lines.append(
            f"{name} ({p['pairing']} pairing), {p['n_completions']} completions, {p['n_steps']} steps:"
        )
        at = {b: j for j, b in enumerate(p["layers_base"])}
        for b in blocks:
            if b in at:
                j = at[b]
                kl, g = p["kl_base_aligned"], p["gamma"]
                lines.append(
                    f"  block {b:>2}: KL(base || aligned) {ci(kl['mean'][j], kl['ci95'][j])}; "
                    f"gamma median {f(g['median'][j])}, mean {ci(g['mean'][j], g['ci95'][j])}"
                )
        h = p["half_kl_layer"]
        lines.append(
            f"  half-KL layer: block {h['block_base']} of the base [95% CI {h['block_base_ci95']}], "
            f"relative depth {f(h['relative_depth_base'])}"
        )
    return "\n".join(lines)


def cost_table(c: dict) -> str:
    head = (
        f"lens cost, {c['prompts']} prompts x {c['samples_per_prompt']} samples x "
        f"{c['max_new_tokens']} tokens, best of {c['repeat']} (seconds; ratio to lens=false):"
    )
    rows = [
        f"  {name:<9} dump {r['dump']:.2f} s ({r['dump_ratio']:.2f}x)   score {r['score']:.2f} s "
        f"({r['score_ratio']:.2f}x)"
        for name, r in c["seconds"].items()
    ]
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default="smollm2-135m-instruct")
    ap.add_argument("--twins", default="smollm2-135m-typical-dpo,smollm2-135m-random-dpo")
    ap.add_argument("--n-samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="outputs/lens_check")
    ap.add_argument(
        "--cost", action="store_true", help="time dump and score with the lens on and off"
    )
    ap.add_argument("--cost-prompts", type=int, default=4)
    ap.add_argument("--cost-samples", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cost:
        result = cost(args, out)
        (out / "cost.json").write_text(json.dumps(result, indent=2))
        text = cost_table(result)
        (out / "cost.txt").write_text(text + "\n")
    else:
        result = measure(args, out)
        text = table(result["layers"])
        (out / "lens-check.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
