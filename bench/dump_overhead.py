"""Dump overhead: full-logit capture to HDF5 vs plain HuggingFace `generate`, and peak RSS.

One process, one loaded model, same prompts, samples, batch composition and seed:
  hf_generate   transformers `generate(do_sample=True, top_k=0)` with no logits kept
  engine_loop   the engine's hooked, KV-cached loop through TransformerBridge, logits dropped
  dump          `engine.commands.dump.run`: the same loop + codec + HDF5 writes (model load excluded)
  score         `engine.commands.score.run` of the same model over the dumped archive (teacher-forced,
                one forward per batch; model load excluded)
Every run generates exactly max_new_tokens per sample (EOS disabled in all three).
Peak RSS is measured in child processes at two sizes of n_samples.

    .venv/bin/python bench/dump_overhead.py [--n-samples 16 --max-new-tokens 64 --batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from bench.common import best_of
from engine.commands import dump as dump_mod
from engine.commands import score as score_mod
from engine.config import CONF
from engine.runtime.models import load_model
from engine.runtime.prompts import render
from engine.runtime.sampling import generate, sample_seed
from engine.runtime.schedule import batches
from engine.runtime.settings import ModelSpec


def compose_cfg(out: Path, args, extra=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "dump",
            overrides=[
                f"model={args.model}",
                f"n_samples={args.n_samples}",
                f"batch_size={args.batch_size}",
                f"max_new_tokens={args.max_new_tokens}",
                f"codec={args.codec}",
                "progress=false",
                f"paths.output_dir={out.parent}",
                f"out={out}",
                "overwrite=true",
                *extra,
            ],
        )


def peak_rss_child(args, n_samples: int, tmp: Path) -> float:
    code = f"""
import resource, sys
sys.argv = ['x']
from bench.dump_overhead import compose_cfg, parse
from engine.commands import dump
args = parse({
        json.dumps(
            [
                "--model",
                args.model,
                "--n-samples",
                str(n_samples),
                "--batch-size",
                str(args.batch_size),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--codec",
                args.codec,
            ]
        )
    })
dump.run(compose_cfg(__import__('pathlib').Path({str(tmp / f"rss{n_samples}.h5")!r}), args))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    return int(res.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--codec", default="fp16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-sizes", default="8,32", help="two n_samples values for peak RSS")
    return ap.parse_args(argv)


def main():
    args = parse()
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        cfg = compose_cfg(tmp / "bench.h5", args)
        lm = load_model(ModelSpec.from_node(cfg.model), "cpu", cfg.paths.cache_dir)
        lm.eos_ids = ()  # every sample runs to max_new_tokens, in all three paths
        prompts = list(cfg.prompts.texts)
        seen = [render(lm.tokenizer, p, False)[1] for p in prompts]
        hf = lm.bridge.original_model
        total_tokens = len(prompts) * args.n_samples * args.max_new_tokens

        def run_hf():
            for p, s0, s1 in batches(len(prompts), args.n_samples, args.batch_size, 0):
                torch.manual_seed(sample_seed(0, s0))
                ids = torch.tensor([seen[p]] * (s1 - s0))
                with torch.inference_mode():
                    out = hf.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=True,
                        top_k=0,
                        top_p=1.0,
                        temperature=1.0,
                        max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens,
                        pad_token_id=lm.tokenizer.pad_token_id,
                    )
                assert out.shape[1] == len(seen[p]) + args.max_new_tokens

        def run_loop():
            for p, s0, s1 in batches(len(prompts), args.n_samples, args.batch_size, 0):
                for _ in generate(
                    lm.bridge,
                    seen[p],
                    [sample_seed(0, i) for i in range(s0, s1)],
                    args.max_new_tokens,
                ):
                    pass

        run_dump = lambda: dump_mod.run(cfg, model=lm)  # noqa: E731
        run_hf()
        run_loop()  # warm-up (allocator, first-call costs)
        t_hf = best_of(run_hf, args.repeats, warmup=False)
        t_loop = best_of(run_loop, args.repeats, warmup=False)
        t_dump = best_of(run_dump, args.repeats, warmup=False)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            scfg = compose(
                "score",
                overrides=[
                    f"archive={tmp / 'bench.h5'}",
                    "progress=false",
                    f"model={args.model}",
                    "model.key=rescored",
                    f"batch_size={args.batch_size}",
                    "overwrite=true",
                ],
            )
        rescorer = dataclasses.replace(lm, key="rescored")
        t_score = best_of(lambda: score_mod.run(scfg, model=rescorer), args.repeats, warmup=False)
        size = (tmp / "bench.h5").stat().st_size
        sizes = [int(s) for s in args.rss_sizes.split(",")]
        rss = {n: peak_rss_child(args, n, tmp) for n in sizes}
    print(
        f"model {args.model}  prompts {len(prompts)} x samples {args.n_samples}  "
        f"steps {args.max_new_tokens}  batch {args.batch_size}  codec {args.codec}  "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'path':<14}{'seconds':>10}{'tokens/s':>12}{'x hf_generate':>15}")
    for name, t in (
        ("hf_generate", t_hf),
        ("engine_loop", t_loop),
        ("dump", t_dump),
        ("score", t_score),
    ):
        print(f"{name:<14}{t:>10.2f}{total_tokens / t:>12.1f}{t / t_hf:>15.3f}")
    print(f"score / dump = {t_score / t_dump:.3f}")
    print(f"archive {size / 2**20:.1f} MiB ({size / total_tokens / 1024:.1f} KiB per step)")
    print(
        "peak RSS (child process, model load included): "
        + ", ".join(f"n_samples={n}: {v:.0f} MiB" for n, v in rss.items())
        + f"  (ratio {rss[sizes[1]] / rss[sizes[0]]:.3f})"
    )


if __name__ == "__main__":
    main()
