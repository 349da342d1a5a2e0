"""The mitigation check: does sampling an aligned twin at a higher temperature restore the
reference model's diversity?  Measured with the engine, nothing planted, with the control.

1. the reference samples the held-out prompts (`open_ended_heldout`, never trained on) with
   full logits; each twin (the typicality twin and the alpha = 0 control) is scored on them;
2. `analysis=mitigation` per twin: T* (the twin's mean per-step entropy equals the
   reference's on those tokens), the argmin-KL temperature and the pooled gamma, exactly;
3. each twin samples the same prompts itself at T = 1, T = T* and T = the pooled gamma (same
   seeds: common random numbers), and `analysis=diversity` compares every dump's texts with
   the reference's own (`analysis.reference=`): differences of per-prompt means with 95%
   bootstrap intervals over prompts;
4. with --answers: the US-states candidates scored exactly under every model (`engine
   answers`, `analysis=answers`): entropy, coverage and KL to the census reference.
Every step is skipped when its output exists (rerun to resume; --fresh starts over).

    python -m bench.mitigation_check [--n-samples 4 --max-new-tokens 32 --out outputs/mitigation]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from analyses.__main__ import run as run_analysis
from analyses.lib.common import write_json
from bench.theory_check import cfg_of
from engine.commands import answers, dump, score
from engine.config import options

KEYS = (
    "sentbert_diversity",
    "ead_words_kirk",
    "compression_ratio_gzip_shaib",
    "homogenization_rougel_shaib",
    "self_bleu_texygen",
)


def num(x, spec: str = ".4f") -> str:
    """A number from a summary (null where undefined) as text."""
    return "–" if x is None else format(x, spec)


def scored(archive: Path, model: str, marker: Path) -> bool:
    """Whether `model` is already complete in `archive` (the marker, or the group itself when
    the process died between the score and the marker)."""
    from engine.archive import Archive

    if marker.exists():
        return True
    if not archive.exists():
        return False
    with Archive(archive) as a:
        done = model in a.models and a.models[model].complete
    if done:
        marker.touch()
    return done


def model_args(name: str) -> list[str]:
    return (
        [f"model={name}"] if name in options("model") else ["model=aligned", f"model.name={name}"]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default="smollm2-135m-instruct")
    ap.add_argument("--twin", default="smollm2-135m-typical-dpo")
    ap.add_argument("--control", default="smollm2-135m-random-dpo")
    ap.add_argument("--prompts", default="open_ended_heldout")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--answers", action="store_true", help="also the US-states answers")
    ap.add_argument("--answer-samples", type=int, default=200)
    ap.add_argument("--out", default="outputs/mitigation")
    ap.add_argument("--fresh", action="store_true", help="delete --out first")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # resume=true: a run killed part-way continues its <out>.partial or partial group (with
    # nothing partial it is a fresh write), so rerunning the script resumes it
    common = ["progress=false"]
    verbs = [*common, "resume=true"]
    times = {}

    def step(name, path: Path, fn):
        if path.exists():
            return
        t = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {times[name]} s", flush=True)

    def sample(model: str, path: Path, temperature: float = 1.0):
        sampling = [
            f"prompts={args.prompts}",
            f"n_samples={args.n_samples}",
            f"batch_size={args.n_samples}",
            f"max_new_tokens={args.max_new_tokens}",
            f"temperature={temperature!r}",
        ]
        step(
            f"dump {path.stem}",
            path,
            lambda: dump.run(
                cfg_of("dump", out / "logs", *model_args(model), *sampling, f"out={path}", *verbs)
            ),
        )

    def analysis(name: str, where: str, *overrides) -> dict:
        d = out / where
        if not (d / "summary.json").exists():
            run_analysis(cfg_of("analyses", d, f"analysis={name}", *overrides, *common))
        return json.loads((d / "summary.json").read_text())

    ref = out / "reference.h5"
    sample(args.reference, ref)
    twins = {"twin": args.twin, "control": args.control}
    for who, name in twins.items():
        # a scored group is the marker; score refuses to add one twice without overwrite
        marker = out / f".scored-{who}"
        scored(ref, name, marker)
        step(
            f"score {who}",
            marker,
            lambda name=name, marker=marker: (
                score.run(
                    cfg_of("score", out / "logs", f"archive={ref}", *model_args(name), *verbs)
                ),
                marker.touch(),
            ),
        )
    result = {"reference": args.reference, "prompts": args.prompts}
    result["reference_diversity"] = analysis("diversity", "diversity-reference", f"archive={ref}")[
        "per_input_mean"
    ]
    for who, name in twins.items():
        m = analysis(
            "mitigation",
            f"mitigation-{who}",
            f"archive={ref}",
            f"analysis.base={args.reference}",
            f"analysis.aligned={name}",
        )
        row = {
            "model": name,
            "base_entropy_mean": m["base_entropy_mean"],
            "aligned_entropy_mean": m["aligned_entropy_mean"],
            "t_entropy": m["t_entropy"],
            "t_kl": m["t_kl"],
            "gamma_pooled": m["gamma_pooled"],
            "samples": {},
        }
        temps = {"T=1": 1.0, "T=T*": m["t_entropy"]["t"], "T=gamma": m["gamma_pooled"]["gamma"]}
        for label, t in temps.items():
            if t is None or t != t:  # T* beyond the grid (null in summary.json)
                continue
            path = out / f"{who}-{label.split('=')[1].replace('*', 'star')}.h5"
            sample(name, path, round(float(t), 4))
            d = analysis(
                "diversity",
                f"diversity-{path.stem}",
                f"archive={path}",
                f"analysis.reference={ref}",
            )
            v = d["vs_reference"]
            row["samples"][label] = {
                "temperature": d["temperature"],
                **{k: v[k] for k in KEYS},
            }
        result[who] = row
    if args.answers:
        cand = out / "answers.h5"
        # prompting as a mitigation: the same candidates, exactly, under the direct prompt and
        # under "Name a random US state" (us_states.yaml's variants)
        for variant in ("direct", "random"):
            path = cand if variant == "direct" else out / f"answers-{variant}.h5"
            step(
                f"answers {variant}",
                path,
                lambda path=path, variant=variant: answers.run(
                    cfg_of(
                        "answers",
                        out / "logs",
                        *model_args(args.reference),
                        f"prompt_variant={variant}",
                        f"out={path}",
                        *verbs,
                    )
                ),
            )
            for who, name in twins.items():
                marker = out / (
                    f".answers-{who}" if variant == "direct" else f".answers-{variant}-{who}"
                )
                scored(path, name, marker)
                step(
                    f"answers {variant} score {who}",
                    marker,
                    lambda name=name, marker=marker, path=path: (
                        score.run(
                            cfg_of(
                                "score", out / "logs", f"archive={path}", *model_args(name), *verbs
                            )
                        ),
                        marker.touch(),
                    ),
                )
            result[f"answers_{variant}"] = analysis(
                "answers", f"answers-exact-{variant}", f"archive={path}"
            )
        # each model samples the prompt itself (T = 1; the twins also at T*): Verbalized
        # Sampling's numbers from sampled answers (coverage-N, precision, KL over observed)
        prompt_file = out / "us_states_prompt.txt"
        prompt_file.write_text(cfg_of("answers", out / "logs").candidates.prompt + "\n")
        draws = {"reference T=1": (args.reference, 1.0)}
        for who, name in twins.items():
            draws[f"{who} T=1"] = (name, 1.0)
            if result[who]["t_entropy"]["found"] and result[who]["t_entropy"]["t"] is not None:
                draws[f"{who} T=T*"] = (name, round(result[who]["t_entropy"]["t"], 4))
        result["answers_sampled"] = {}
        for label, (name, t) in draws.items():
            path = (
                out / f"answers-{label.replace(' ', '-').replace('*', 'star').replace('=', '')}.h5"
            )
            step(
                f"dump {path.stem}",
                path,
                lambda name=name, t=t, path=path: dump.run(
                    cfg_of(
                        "dump",
                        out / "logs",
                        *model_args(name),
                        "prompts=file",
                        f"prompts.file={prompt_file}",
                        "chat_template=auto",
                        f"n_samples={args.answer_samples}",
                        "max_new_tokens=8",
                        f"temperature={t!r}",
                        f"out={path}",
                        *verbs,
                    )
                ),
            )
            s = analysis(
                "answers", f"answers-{path.stem}", f"archive={cand}", f"analysis.samples={path}"
            )["sampled_vs_exact"]
            result["answers_sampled"][label] = {
                "temperature": t,
                "vs_style": s["vs_style"],
                "share_outside_set": s["share_outside_set"],
                "kl_sampled_to_reference_model_exact": s["by_n"][-1]["kl_sampled_to_exact"],
                # vs_style.exact and kl_sampled_to_* are the candidates archive's generator's
                "exact_is_of": args.reference,
            }
    result["seconds"] = times
    write_json(out, "summary.json", result)
    for who in twins:
        r = result[who]
        t = r["t_entropy"]
        print(
            f"{who} ({r['model']}): entropy {num(r['aligned_entropy_mean'])} vs reference "
            f"{num(r['base_entropy_mean'])} nats; T* {num(t['t'])} [{num(t['ci95'][0])}, "
            f"{num(t['ci95'][1])}]; gamma {num(r['gamma_pooled']['gamma'])}"
        )
        for label, s in r["samples"].items():
            print(
                f"  {label}: "
                + ", ".join(
                    f"{k} {num(s[k]['delta'], '+.4f')} [{num(s[k]['ci95'][0], '+.4f')}, "
                    f"{num(s[k]['ci95'][1], '+.4f')}]"
                    for k in KEYS[:3]
                )
            )
    print(f"summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
