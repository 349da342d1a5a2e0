"""`python -m engine inspect ARCHIVE [--sample I --step T --topk K] [--render] [--html OUT]`.

Reads archives through `engine.archive` (no torch); never loads a model.  Token text comes
from the archive's own tokenizer record (`ModelView.text`).  `--html` writes the interactive
token explorer, built by `engine.explorer`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import kernels as K
from engine import explorer
from engine.archive import Archive, ModelView
from engine.archive.format import FINISH_REASONS
from engine.cli import parse_samples, user_errors
from engine.errors import EngineError
from kernels import reference


def summary(a: Archive) -> str:
    size = a.size_bytes
    s = a.samples()
    lines = [
        f"archive  {a.path}  ({size / 2**20:.1f} MiB on disk)",
        f"format   logit-archive v{a.format_version}, "
        + ("complete" if a.complete else f"INCOMPLETE: {a.n_complete} of {a.n_samples} samples"),
        f"created  {a.created or '?'}  git {a.git_commit or '?'}",
        f"packages {', '.join(f'{k} {v}' for k, v in a.packages.items() if v)}",
        f"prompts  {len(a.prompts)}",
    ]
    if a.shard:
        d = a.shard
        lines.insert(
            2,
            f"shard    {d.index} of {d.count}: samples {d.start}..{d.stop - 1} "
            f"of {d.total} (join the shards with `python -m engine merge`)",
        )
    how = "rows read from" if a.model().logits.is_virtual else "copied from"
    lines[2:2] = [
        f"merged   shard {r['index']}: samples {r['start']}..{r['stop'] - 1} {how} "
        f"{r['path']} (host {r['host'] or '?'}, sha256 {r['sha256'][:16]})"
        for r in a.merged_from
    ]
    for i, p in enumerate(a.prompts):
        lines.append(f"  [{i}] {p!r}  ({int(np.sum(s['prompt_index'] == i))} samples)")
    n = len(s["length"])
    mean_len = float(s["length"].mean()) if n else 0.0
    reasons = {k: int(np.sum(s["finish_reason"] == v)) for k, v in FINISH_REASONS.items()}
    bad = f"  ended on non-finite logits {reasons['nonfinite']}" if reasons["nonfinite"] else ""
    lines.append(
        f"samples  {n}  steps <= {a.max_new_tokens}  mean length {mean_len:.1f}  "
        f"ended by EOS {reasons['eos']}{bad}"
    )
    lines.append(f"models   {len(a.models)} (generator: {a.generator})")
    for key, m in a.models.items():
        p = m.provenance
        nbytes = m.storage_bytes
        lines.append(
            f"  {key}: source={p.get('source')} name={p.get('name')} "
            f"dtype={p.get('dtype')} vocab={m.vocab_size} codec={m.codec} "
            f"chunks=(1, {m.chunk_steps}, {m.vocab_size}) logits {nbytes / 2**20:.1f} MiB"
        )
        lines.append(
            f"    revision={p.get('revision') or '-'} "
            f"weights_sha256={(p.get('weights_sha256') or '-')[:16]} "
            f"tokenizer={p.get('tokenizer_name')} vocab_hash={str(p.get('vocab_hash'))[:16]}"
        )
        lines.append(f"    {self_check_line(m)}")
        if m.activations:
            lines.append(f"    activations: {', '.join(m.activations)}")
        if m.lens is not None:
            lines.append(f"    {lens_line(m.lens)}")
        if m.role == "scored":
            state = "complete" if m.complete else f"PARTIAL {m.n_complete}/{a.n_samples}"
            lines.append(f"    scored (teacher-forced), {state}, chat_template={m.chat_template}")
    for name, lp in a.layer_pairs.items():
        state = "complete" if lp.complete else f"PARTIAL {lp.n_complete}/{a.n_samples}"
        lines.append(
            f"layer pairs {name}: {len(lp.layers_base)} pairs by {lp.pairing} (blocks "
            f"{_span(lp.layers_base)} of {lp.depth_base} / {_span(lp.layers_aligned)} of "
            f"{lp.depth_aligned}), {state}"
        )
    lin = a.lineage()
    if lin is not None:
        lines.append(f"lineage  from {lin['source_archive']}")
        for i, (par, var, cut, ed) in enumerate(
            zip(lin["parent_sample"], lin["variant"], lin["cut"], lin["edit"])
        ):
            lines.append(f"  prompt [{i}] parent {par} {var} cut {cut}: {ed}")
    return "\n".join(lines)


def _span(layers) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 6 else f"{layers[0]}..{layers[-1]}"


def lens_line(lens) -> str:
    """The group's logit lens (format version 6), in one line."""
    c = lens.check
    check = (
        "check not recorded"
        if c is None
        else f"last-block check |Δ| {c['max_abs_diff']:.3g} <= bound {c['bound']:.3g}"
        if c["max_abs_diff"] <= c["bound"]
        else f"last-block check FAILED |Δ| {c['max_abs_diff']:.3g} > bound {c['bound']:.3g}"
    )
    return (
        f"logit lens: {len(lens.layers)} of {lens.n_layers} blocks ({_span(lens.layers.tolist())}), "
        f"top-{lens.k}, {lens.convention}; {check}"
    )


def self_check_line(m: ModelView) -> str:
    """The group's run self-check (engine.runtime.selfcheck), in one line."""
    c = m.self_check
    if c is None:
        why = "teacher-forced group" if m.role == "scored" else "not recorded"
        return f"self-check: none ({why})"
    verdict = "ok" if c["max_abs_diff"] <= c["bound"] else "FAILED"
    return (
        f"self-check: {verdict}, max |d log p| {c['max_abs_diff']:.3g} nats (bound "
        f"{c['bound']:.3g}) on sample {c['sample']}, {c['steps']} steps"
    )


def _check_sample(a: Archive, sample: int) -> int:
    if not 0 <= sample < a.n_complete:
        raise EngineError(f"--sample {sample} out of range (0..{a.n_complete - 1})")
    return sample


def topk(a: Archive, m: ModelView, sample: int, step: int, k: int) -> str:
    s = a.samples()
    length = int(s["length"][sample])
    if not 0 <= step < length:
        raise EngineError(f"--step {step} out of range: sample {sample} has {length} steps")
    text = m.text
    prompt_ids = m.prompt_tokens(int(s["prompt_index"][sample]))
    gen = s["tokens"][sample, :step]
    row = m.rows(sample, step).astype(np.float64)
    if not np.isfinite(row.max()):
        raise EngineError("row has no finite logit")
    lp = reference.log_softmax(row)  # float64: one row, printed to 4 decimals
    p = np.exp(lp)
    h = float(-np.sum(p * lp))
    order = np.argsort(-lp, kind="stable")
    chosen = int(s["tokens"][sample, step])
    rank = int(np.sum(lp > lp[chosen])) + 1
    out = [
        f"context  {text(list(prompt_ids) + list(gen))!r}",
        f"step {step} of sample {sample} ({m.key}): entropy {h:.4f} nats = {h / np.log(2):.4f} bits, "
        f"branching factor exp(H) {np.exp(h):.2f}",
        f"sampled  {text.piece(chosen)!r} (id {chosen}) p={p[chosen]:.4f} rank {rank}",
        f"top-{k}:",
    ]
    for r, i in enumerate(order[:k], 1):
        out.append(f"  {r:>3}  p={p[i]:.4f}  logp={lp[i]:9.4f}  id {int(i):>6}  {text.piece(i)!r}")
    return "\n".join(out)


def use_colour(setting: str = "auto") -> bool:
    """--color auto: ANSI colours only on a terminal and without NO_COLOR (no-color.org)."""
    if setting == "auto":
        return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return setting == "always"


def _colour(p: float, piece: str, colour: bool = True) -> str:
    """Token on a red (p -> 0) to green (p -> 1) background, as in the paper's figure; without
    colour, the token followed by its probability."""
    if not colour:
        return f"{piece}⟨{p:.2f}⟩"
    r, g = int(255 * (1 - p)), int(200 * p + 55 * (1 - p))
    return f"\x1b[48;2;{r};{g};60m\x1b[38;2;0;0;0m{piece}\x1b[0m"


def render(a: Archive, m: ModelView, samples, colour: bool = True) -> str:
    s = a.samples()
    text = m.text
    lin = a.lineage()
    out = [
        "probability of each sampled token: red = low, green = high"
        if colour
        else "each sampled token followed by its probability ⟨p⟩"
    ]
    for i in samples:
        n = int(s["length"][i])
        toks = s["tokens"][i, :n]
        probs = np.exp(K.token_stats(m.rows(i, slice(0, n)), toks).logprob)  # [step]
        p = int(s["prompt_index"][i])
        body = "".join(_colour(float(pr), text.piece(t), colour) for t, pr in zip(toks, probs))
        where = ""
        if lin is not None:  # perturbation archive: say which prefix this continuation read
            where = (
                f", {lin['variant'][p]} of parent {int(lin['parent_sample'][p])}"
                f" (cut {int(lin['cut'][p])}): {lin['edit'][p]}"
            )
        out.append(
            f"--- sample {i} ({m.key}, prompt {p}{where}, mean p "
            f"{probs.mean() if n else 0:.3f})\n{m.prompt_text[p]}{body}"
        )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m engine inspect", description=__doc__.split("\n")[0]
    )
    ap.add_argument("archive")
    ap.add_argument("--model", help="model group (default: the generator)")
    ap.add_argument("--sample", type=int, help="sample index")
    ap.add_argument("--step", type=int, help="step index (with --sample)")
    ap.add_argument("--topk", type=int, default=10, help="top-K next tokens to list (default 10)")
    ap.add_argument(
        "--render",
        action="store_true",
        help="print completions coloured by each token's probability",
    )
    ap.add_argument(
        "--limit",
        type=int,
        help="samples to render without --sample or --samples (default 5; --html: "
        f"{explorer.DEFAULT_SAMPLES})",
    )
    ap.add_argument(
        "--samples",
        help="samples to render, e.g. 0,8 or 0,3,10-20 (ranges inclusive; rendered in index order)",
    )
    ap.add_argument(
        "--html",
        metavar="OUT",
        help="write the interactive token explorer of the chosen samples to OUT (one "
        "standalone HTML file; base: --model, aligned: --aligned)",
    )
    ap.add_argument(
        "--aligned",
        metavar="KEY",
        help="--html: the model group compared with the base (default: the first other group)",
    )
    ap.add_argument("--overwrite", action="store_true", help="--html: replace an existing OUT")
    ap.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="ANSI colours for --render (auto: on a terminal, unless NO_COLOR is set)",
    )
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with user_errors():
        if args.topk < 1:
            raise EngineError("--topk must be >= 1")
        with Archive(args.archive, allow_partial=True) as a:
            m = a.model(args.model)
            if args.sample is not None:
                _check_sample(a, args.sample)
            if args.html:
                r = explorer.write(
                    a,
                    args.html,
                    args.samples or ([args.sample] if args.sample is not None else None),
                    args.topk,
                    args.model,
                    args.aligned,
                    args.overwrite,
                    limit=explorer.DEFAULT_SAMPLES if args.limit is None else args.limit,
                )
                print(
                    f"wrote {r['out']} ({r['bytes'] / 2**10:.0f} KiB: {r['samples']} samples, "
                    f"{r['steps']} steps, models {', '.join(r['models'])})"
                )
            elif args.render:
                if args.samples:
                    chosen = parse_samples(args.samples, a.n_complete)
                elif args.sample is not None:
                    chosen = [args.sample]
                else:
                    chosen = range(min(5 if args.limit is None else args.limit, a.n_complete))
                print(render(a, m, chosen, use_colour(args.color)))
            elif args.step is not None:
                if args.sample is None:
                    raise EngineError("--step needs --sample")
                print(topk(a, m, args.sample, args.step, args.topk))
            elif args.sample is not None:
                raise EngineError(
                    f"--sample {args.sample} needs --step T (its top-k next tokens) "
                    f"or --render (its completion)"
                )
            else:
                print(summary(a))
    return 0
