"""`python -m engine answers candidates=NAME`: the exact probability of every answer in an
enumerable set (Verbalized Sampling's "Name a US state"), from the model's own logits.

A candidates file (conf/candidates/*.yaml) holds one prompt, the candidate answers and
optionally a reference distribution (weights, normalised by the analysis).  Each candidate is
teacher-forced after the prompt (read through the model's chat template when it has one:
`chat_template`) as the *whole* answer: its tokens followed by a terminator, by default the
model's end-of-answer token (`terminator: eos`), so the set is prefix-free ("New" + EOS and
"New York" + EOS are different answers) and P(candidate) = prod_t p(token_t | prompt, earlier
tokens) is the probability that the model answers exactly that.  `terminator: null` scores
the bare tokens (only prefix-free sets, e.g. single tokens); any other string is tokenized and
appended.

The prompt is the file's `prompt`, or with `prompt_variant=NAME` its `variants.NAME` (the same
candidates under another wording, e.g. us_states' `direct` and `random`: prompting as a
mitigation of mode collapse, Zhang et al. 2025, arXiv:2510.01171).  Only prompts that the
answer follows directly fit exact scoring: a prompt that has the model list states before it
picks one would need every list scored too, which this command does not do.

The result is an ordinary logit archive: sample i is candidate i (its tokens and the full
logits of every step), so `score` adds a second model on the same tokens and `inspect` reads
it; `/answers` adds the candidate texts, the reference and the prompt variant
(docs/archive-format.md).
"""

from __future__ import annotations

import logging

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from engine.cli import user_errors
from engine.commands.common import config_yaml, run_key
from engine.config import CONF
from engine.errors import EngineError
from engine.runtime import output
from engine.runtime import run as R
from engine.runtime.models import LoadedModel
from engine.runtime.overlap import encoded
from engine.runtime.prompts import check_chat_template
from engine.runtime.sampling import input_device
from engine.runtime.schedule import fill
from engine.runtime.settings import ModelSpec, Output, RunSettings, Shape
from engine.runtime.teacher import teacher_forced_steps

log = logging.getLogger(__name__)
KEYS = ("candidates", "prompt_variant", "chat_template", "codec", "q16_window", "batch_size")


def prompt_of(ccfg, variant) -> tuple[str, str]:
    """(prompt text, variant name) of a candidates node: `variants[variant]` when a variant is
    named, else `prompt`, labelled with the name of the variant that has exactly that text
    ("" for none), so an archive records which wording it scored either way."""
    variants = ccfg.get("variants") or {}
    if variant is not None and str(variant) != "":
        if str(variant) not in variants:
            have = ", ".join(map(str, variants)) or "none"
            raise EngineError(
                f"prompt_variant={variant} is not a variant of the candidates file "
                f"{ccfg.get('name', '')!r} (its variants: {have})"
            )
        text = variants[str(variant)]
        if not text:
            raise EngineError(f"candidates variant {variant!r} has an empty prompt")
        return str(text), str(variant)
    if not ccfg.get("prompt"):
        return "", ""
    text = str(ccfg.prompt)
    return text, next((str(k) for k, v in variants.items() if str(v) == text), "")


def load_candidates(ccfg, variant=None) -> dict:
    """The candidates node: prompt (and its variant name, see `prompt_of`), candidate texts,
    terminator, reference weights (or None)."""
    cands = [str(c) for c in (ccfg.get("candidates") or [])]
    prompt, variant = prompt_of(ccfg, variant)
    if not prompt or not cands:
        raise EngineError("a candidates file needs `prompt` and a non-empty `candidates` list")
    if len(set(cands)) != len(cands):
        dup = next(c for c in cands if cands.count(c) > 1)
        raise EngineError(f"candidate {dup!r} is listed twice")
    ref = ccfg.get("reference")
    weights = None
    if ref:
        ref = {str(k): float(v) for k, v in OmegaConf.to_container(ref).items()}
        unknown = sorted(set(ref) - set(cands))
        if unknown:
            raise EngineError(f"reference names {unknown[0]!r}, which is not a candidate")
        weights = np.array([ref.get(c, 0.0) for c in cands])
        if (weights < 0).any() or weights.sum() <= 0:
            raise EngineError("reference weights must be >= 0 and not all 0")
    return {
        "prompt": prompt,
        "prompt_variant": variant,
        "candidates": cands,
        "reference": weights,
        "terminator": ccfg.get("terminator", "eos"),
    }


def candidate_tokens(lm: LoadedModel, cands: list[str], terminator) -> list[list[int]]:
    """Token ids of each candidate as a whole answer (see the module docstring)."""
    tok = lm.tokenizer
    if terminator == "eos":
        eos = tok.eos_token_id if tok.eos_token_id is not None else (lm.eos_ids or [None])[0]
        if eos is None:
            raise EngineError(f"{lm.key} has no EOS token: set terminator to a string or null")
        end = [int(eos)]
    elif terminator is None:
        end = []
    else:
        end = tok(str(terminator), add_special_tokens=False)["input_ids"]
    out = []
    for c in cands:
        ids = tok(c, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EngineError(f"candidate {c!r} tokenizes to nothing")
        out.append([int(i) for i in ids] + end)
    seqs = [tuple(s) for s in out]
    for i, s in enumerate(seqs):  # prefix-free, or the probabilities overlap
        for j, t in enumerate(seqs):
            if i != j and len(s) < len(t) and t[: len(s)] == s:
                raise EngineError(
                    f"candidate {cands[i]!r} is a prefix of {cands[j]!r} as tokens: "
                    f"use a terminator (terminator: eos)"
                )
    return out


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    spec = ModelSpec.from_node(cfg.model)
    rs = R.resolve_batch_size(RunSettings.from_cfg(cfg))
    check_chat_template(cfg.chat_template)
    c = load_candidates(cfg.candidates, cfg.get("prompt_variant"))
    key = run_key(cfg, KEYS, device=R.device_type(rs.device), batch_size=rs.batch_size)
    plan = output.plan_output(Output.from_cfg(cfg), key)
    lm = R.load(spec, rs, model)
    seen = R.read_prompts(lm, [c["prompt"]], cfg.chat_template)
    seqs = candidate_tokens(lm, c["candidates"], c["terminator"])
    n, T = len(seqs), max(len(s) for s in seqs)
    tokens = np.full((n, T), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    length = np.array([len(s) for s in seqs], dtype=np.int64)
    # the archive's shape: one sample per candidate, as long as the longest
    shape = Shape(n, T, config_yaml(cfg, n_samples=n, max_new_tokens=T, batch_size=rs.batch_size))

    def create(partial):
        return R.create_archive(
            partial, key, shape, [c["prompt"]], R.model_info(lm, seen), rs.codec
        )

    def answers(w):
        name = str(cfg.candidates.get("name", ""))
        w.write_answers(c["candidates"], c["reference"], c["terminator"], name, c["prompt_variant"])

    with output.new_archive(plan, "answers", create, key, answers) as writer:
        check = R.FirstBatchCheck(writer, lm, rs.codec.window)

        def write(p, s0, s1):
            steps = teacher_forced_steps(
                lm.bridge, seen.ids[0], tokens[s0:s1], length[s0:s1], input_device(lm.bridge)
            )
            writer.write_batch(
                s0, [0] * (s1 - s0), encoded(steps, rs.codec.codec, rs.codec.window), lm.eos_ids
            )
            check.after(seen.ids[0], s0, s1 - s0)

        fill(
            1,
            n,
            rs.batch_size,
            writer.n_complete,
            f"answers {lm.key}",
            write,
            progress=rs.progress,
            device=rs.device,
        )
        writer.finish()
    log.info("wrote %s: %d candidates scored by %s", plan.out, n, lm.key)
    return {
        "archive": str(plan.out),
        "model": lm.key,
        "candidates": n,
        "max_tokens": T,
        "prompt": c["prompt"],
        "prompt_variant": c["prompt_variant"],
    }


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="answers")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"archive: {result['archive']}  ({result['candidates']} candidates, {result['model']})")


if __name__ == "__main__":
    main()
