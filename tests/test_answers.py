"""Exact answer distributions (`engine answers`, `analysis=answers`) on tiny-random."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analyses.__main__ import run as run_analysis
from engine.archive import Archive
from engine.commands import answers, dump, score
from engine.errors import EngineError
from engine.runtime.models import load_model
from engine.runtime.sampling import forward_logits
from engine.runtime.settings import ModelSpec
from tests.conftest import DEVICE, compose_cfg
from tests.test_analyses import analysis_cfg

PROMPT = "1"  # tiny-random offers two printable two-step answers above 0.02 here


def planted_candidates(lm):
    """Two-step answers (first token, terminator) of the tiny model with probabilities large
    enough for sampling to check them: the terminator that gives the most first tokens a
    joint probability of at least 0.02, and those first tokens."""
    tok = lm.tokenizer
    ids = tok(PROMPT)["input_ids"]
    roundtrip = lambda i: tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]
    dist = lambda x: torch.softmax(
        forward_logits(lm.bridge, torch.tensor([x], device=lm.device))[0, -1].float(), -1
    )
    p0 = dist(ids)
    first = [i for i in torch.argsort(p0, descending=True).tolist() if roundtrip(i)][:12]
    joint = torch.stack([p0[c] * dist(ids + [c]) for c in first])  # [first, terminator]
    ok = [t for t in range(joint.shape[1]) if roundtrip(t) and t != tok.eos_token_id]
    best = max(ok, key=lambda t: (int((joint[:, t] >= 0.02).sum()), float(joint[:, t].sum())))
    chosen = [c for j, c in enumerate(first) if joint[j, best] >= 0.02]
    assert len(chosen) >= 2, "the tiny model offers no checkable candidate set"
    return [tok.decode([c]) for c in chosen], tok.decode([best])


def test_exact_distribution_matches_sampled_frequencies(tmp_path, cache_dir):
    """4000 sampled answers: each candidate's frequency is within 4 binomial standard errors
    of its exact probability (from the stored logits), and the KL to the exact distribution
    sits at the multinomial noise level."""
    dcfg = compose_cfg(
        "dump",
        tmp_path,
        cache_dir,
        ["model=tiny-random", "prompts=file", f"prompts.file={tmp_path}/p.txt"],
    )
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    lm = load_model(ModelSpec.from_node(dcfg.model), DEVICE)
    cands, term = planted_candidates(lm)
    acfg = compose_cfg(
        "answers",
        tmp_path,
        cache_dir,
        [
            "model=tiny-random",
            "candidates.reference=null",
            "chat_template=false",
            f"out={tmp_path}/ans.h5",
        ],
    )
    acfg.candidates.prompt, acfg.candidates.terminator = PROMPT, term  # any bytes: no quoting
    acfg.candidates.candidates = cands
    path = answers.run(acfg, model=lm)["archive"]
    N = 4000
    scfg = compose_cfg(
        "dump",
        tmp_path,
        cache_dir,
        [
            "model=tiny-random",
            "prompts=file",
            f"prompts.file={tmp_path}/p.txt",
            f"n_samples={N}",
            "max_new_tokens=2",
            "batch_size=200",
            "codec=q16",
            f"out={tmp_path}/samples.h5",
        ],
    )
    samples = dump.run(scfg, model=lm)["archive"]
    s = run_analysis(
        analysis_cfg(
            tmp_path / "a", "analysis=answers", f"archive={path}", f"analysis.samples={samples}"
        )
    )
    from analyses.answers import candidate_logp

    with Archive(path) as a, Archive(samples) as b:
        P = np.exp(candidate_logp(a, "tiny-random"))
        sa, sb = a.samples(), b.samples()
        seqs = [tuple(sa["tokens"][i, : int(sa["length"][i])]) for i in range(len(cands))]
        got = [tuple(sb["tokens"][i, : int(sb["length"][i])]) for i in range(N)]
    assert (P > 0.01).all(), P  # the check below is not trivial
    for c, p, seq in zip(cands, P, seqs):
        f = sum(g == seq for g in got) / N
        assert abs(f - p) <= 4 * np.sqrt(p * (1 - p) / N) + 1e-3, (c, f, p)
    last = s["sampled_vs_exact"]["by_n"][-1]
    assert last["n"] == N and last["kl_sampled_to_exact"] <= 3 * last["kl_multinomial_noise_95"]
    # Verbalized Sampling's way: the samples decoded here with the model's own tokenizer (the
    # analysis uses the archive's tokenizer record), EOS dropped, scored by their definitions.
    # The planted terminator is a printable token that stays in the text, so few or no answers
    # match by text here; the hand-computed end-to-end numbers are in the prompt-variant test.
    from analyses.answers import vs_metrics

    eos = lm.tokenizer.eos_token_id
    texts = [lm.tokenizer.decode([t for t in g if t != eos]) for g in got]
    vs = s["sampled_vs_exact"]["vs_style"]
    assert {k: vs[k] for k in vs if k not in ("source", "exact")} == pytest.approx(
        vs_metrics(texts, cands), abs=1e-12
    )
    m = s["models"]["tiny-random"]
    assert vs["exact"]["kl_to_uniform"] == m["kl_to_uniform"]
    assert vs["exact"]["mass_in_set"] == m["mass_in_set"]
    assert vs["exact"]["expected_coverage_n"] == pytest.approx(np.mean(1 - (1 - P) ** N))
    assert s["prompt"] == PROMPT and s["prompt_variant"] == ""  # a prompt of no variant


def test_exact_sequence_gamma_recovers_a_token_tempering_only_for_single_step_answers(
    tmp_path, cache_dir
):
    """The tempered twin raises every next-token distribution to gamma (token level).  Over a
    set of one-token answers (terminator null) the sequence-level distribution over the set is
    then exactly base**gamma renormalised, so the exact sequence gamma equals the planted 1.7;
    with a terminator step the per-candidate normalisers of the second step differ and it need
    not (the per-step gamma still does)."""
    single = [chr(c) for c in range(ord("a"), ord("a") + 8)]
    out = {}
    for term in ("null", "'.'"):
        acfg = compose_cfg(
            "answers",
            tmp_path,
            cache_dir,
            [
                "model=tiny-random",
                "candidates.prompt='Hello'",
                f"candidates.candidates={single}",
                f"candidates.terminator={term}",
                "candidates.reference=null",
                "chat_template=false",
                "codec=fp32",  # fp16 rounding of logits near 100 moves gamma by ~1e-3
                f"out={tmp_path}/g{len(out)}.h5",
            ],
        )
        path = answers.run(acfg)["archive"]
        score.run(
            compose_cfg(
                "score",
                tmp_path,
                cache_dir,
                [f"archive={path}", "model=tempered", "model.base=tiny-random", "model.gamma=1.7"],
            )
        )
        s = run_analysis(
            analysis_cfg(tmp_path / f"a{len(out)}", "analysis=answers", f"archive={path}")
        )
        out[term] = next(iter(s["pairs"].values()))
    assert out["null"]["gamma_sequence_level_exact"] == pytest.approx(1.7, abs=1e-4)
    assert out["null"]["gamma_per_step_pooled"]["gamma"] == pytest.approx(1.7, abs=1e-3)
    assert out["'.'"]["gamma_per_step_pooled"]["gamma"] == pytest.approx(1.7, abs=1e-3)
    assert abs(out["'.'"]["gamma_sequence_level_exact"] - 1.7) > 1e-3  # not the same thing


@pytest.mark.parametrize(
    "override, msg",
    [
        ("candidates.candidates=[a,b,a]", "listed twice"),
        ("candidates.reference={zz: 1}", "not a candidate"),
        ("candidates.terminator=null", "prefix of"),
    ],
)
def test_bad_candidate_files_get_one_clear_error(tmp_path, cache_dir, override, msg):
    base = [
        "model=tiny-random",
        "candidates.prompt='Hi'",
        "candidates.candidates=[ab,abc]",
        "candidates.reference=null",
        "chat_template=false",
        f"out={tmp_path}/x.h5",
    ]
    with pytest.raises(EngineError, match=msg):
        answers.run(compose_cfg("answers", tmp_path, cache_dir, [*base, override]))


def test_prompt_variant_changes_the_prompt_and_is_recorded(tmp_path, cache_dir):
    """us_states' `random` wording is teacher-forced instead of `direct`: other prompt tokens
    (the text tokenized as the model reads it), the same candidate tokens, and the variant
    name in /answers and in the analysis summary; an unknown variant is one clear error.

    Each archive is also read as its own samples (same prompt; one "sampled" answer per
    candidate, each ending in EOS), which gives Verbalized Sampling's numbers by hand: every
    answer correct and distinct, counts uniform, so precision 1, coverage-N 1, KL to uniform 0
    and KL(reference || observed) = 2 * 1/4 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8)."""
    base = [
        "model=tiny-random",
        "candidates.candidates=[Ohio,Utah,Iowa]",
        "candidates.reference=null",  # set below: an override would merge into the 50 states
        "chat_template=false",
    ]
    lm = load_model(
        ModelSpec.from_node(compose_cfg("answers", tmp_path, cache_dir, base).model), DEVICE
    )
    got = {}
    for variant in ("null", "random"):
        cfg = compose_cfg(
            "answers",
            tmp_path,
            cache_dir,
            [*base, f"prompt_variant={variant}", f"out={tmp_path}/{variant}.h5"],
        )
        cfg.candidates.reference = {"Ohio": 1, "Utah": 1, "Iowa": 2}
        r = answers.run(cfg, model=lm)
        with Archive(r["archive"]) as a:
            s = a.samples()
            got[variant] = (
                a.model().prompt_tokens(0),
                a.prompts[0],
                a.answers()["prompt_variant"],
                s["tokens"][:, : int(s["length"].max())].tolist(),
            )
        summary = run_analysis(
            analysis_cfg(
                tmp_path / f"a_{variant}",
                "analysis=answers",
                f"archive={r['archive']}",
                f"analysis.samples={r['archive']}",
            )
        )
        assert (summary["prompt"], summary["prompt_variant"]) == got[variant][1:3]
        vs = summary["sampled_vs_exact"]["vs_style"]
        assert (vs["n_responses"], vs["n_correct"], vs["n_distinct_correct"]) == (3, 3, 3)
        assert (vs["precision"], vs["coverage_n"]) == (1.0, 1.0)
        assert vs["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
        assert vs["kl_reference_to_observed"] == pytest.approx(0.5 * np.log(9 / 8), abs=1e-9)
        m = summary["models"]["tiny-random"]
        assert vs["exact"]["kl_to_reference"] == m["kl_to_reference"]
    variants = cfg.candidates.variants
    assert got["null"][1:3] == (variants.direct, "direct")  # no variant named: `prompt`
    assert got["random"][1:3] == (variants.random, "random")
    assert got["random"][1] == "Name a random US state. Answer with the name only."
    assert got["random"][0] == lm.tokenizer(variants.random)["input_ids"]
    assert got["null"][0] != got["random"][0]
    assert got["null"][3] == got["random"][3]  # the same answers, only the prompt differs
    with pytest.raises(EngineError, match=r"prompt_variant=list_then_pick is not a variant"):
        answers.run(
            compose_cfg(
                "answers",
                tmp_path,
                cache_dir,
                [*base, "prompt_variant=list_then_pick", f"out={tmp_path}/x.h5"],
            ),
            model=lm,
        )
