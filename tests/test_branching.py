"""Yang & Holtzman's branching factor in analysis=entropy, against a hand computation.

A tiny-random archive's rows, tokens, lengths and sampling settings are replaced by planted
ones; the test then follows their published code (github.com/yangalan123/LLMBranchingFactor,
commit 237d78f) step by step in plain Python and float64, with dicts and loops as theirs are
written, sharing nothing with `analyses/lib/branching.py`:

- `loglik_computation.get_truncated_dist_top_p` and `get_token_truncated_dist_from_vllm_outputs`
  (top_p_mode): the per-token truncated, renormalised distribution, its entropy and the
  sampled token's log-probability under it (vLLM's table: the K most probable tokens of the
  distribution it sampled from, and the sampled token);
- `common_utils.condense_arrays_with_inconsistent_lengths`: per-position pooling;
- `uncertainty_computation.compute_bf_values` on the cumulated profile, the entropy branch up
  to `asymptotic_limit` positions and the NLL branch past it;
- `demo/demo.py` `step3_compute_bf_values`: exp per prompt, mean over prompts.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from analyses.__main__ import run as run_analysis
from analyses.entropy import terminal_lines
from engine.commands import dump as dump_mod
from tests.conftest import compose_dump
from tests.test_analyses import analysis_cfg

S_PER_PROMPT, T = 6, 12
#: planted lengths: prompt 0 reaches 10 condensed positions (four samples reach step 9; sample
#: 2 ends at NAN_ROW), prompt 1 four (three samples are shorter than 5 tokens)
LENGTHS = [[12, 12, 11, 9, 6, 12], [12, 3, 5, 4, 12, 2]]
NAN_ROW = (2, 10)  # (sample, step): non-finite logits, the sample ends before them
#: the sampling settings planted in the run key (the engine warps raw logits with them)
WARP = {"temperature": 0.8, "top_k": 120, "top_p": 0.97}


def log_softmax(x):
    m = np.max(x[np.isfinite(x)])
    return x - (m + np.log(np.sum(np.exp(x - m))))


def warped(raw, temperature, top_k, top_p):
    """The distribution the engine samples from (engine/runtime/sampling.py `warp`), as
    log-probabilities: temperature, top-k, then drop where the mass before reaches top_p."""
    x = np.array(raw, np.float64) / temperature
    if top_k and top_k < len(x):
        x[x < np.sort(x)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
        order = np.argsort(-x, kind="stable")
        p = np.exp(log_softmax(x[order]))
        before = np.cumsum(p) - p
        x[order[before >= top_p]] = -np.inf
    return log_softmax(x)


def their_token(logp, token, top_p, k):
    """Entropy and log-likelihood of one token, their way (dicts, sorted, loop, softmax)."""
    table = {int(t): float(logp[t]) for t in np.argsort(-logp, kind="stable")[:k]}
    table.setdefault(int(token), float(logp[token]))  # vLLM adds the sampled token
    cumulative, truncated = 0.0, {}
    for key, value in sorted(table.items(), key=lambda kv: kv[1], reverse=True):
        e = np.exp(value)
        if np.isinf(value) or e < 1e-12:
            continue
        cumulative += e
        truncated[key] = value
        if cumulative >= top_p:
            break
    if int(token) not in truncated:
        truncated[int(token)] = table[int(token)]
    values = np.array(list(truncated.values()))
    q = np.exp(values - values.max())
    q = q / q.sum()
    return float(-np.sum(q * np.log(q))), float(np.log(q[list(truncated).index(int(token))]))


def their_condense(array, prefix_mode=False, divide_by_length=False):
    quantile_length = np.quantile([len(x) for x in array], 0.95)
    cumsums = [np.cumsum(x) for x in array]
    out = []
    for i in range(int(quantile_length)):
        if prefix_mode:
            at = np.array([cumsums[j][i] for j, x in enumerate(array) if len(x) >= i + 1])
        else:
            at = np.array([x[i] for x in array if len(x) >= i + 1])
        if divide_by_length:
            at = at / (i + 1)
        if len(at) <= 3:
            break
        out.append(np.mean(at))
    return out


def their_bf(raw, tokens, lengths, prompt_index, n_prompts, *, top_p, k, limit, warp):
    """Per-prompt BF and their dataset-level value (mean of per-prompt BFs)."""
    entropy_profile, loglik_profile = [], []
    for p in range(n_prompts):
        ent, ll = [], []
        for i in np.flatnonzero(prompt_index == p):
            e_i, l_i = [], []
            for t in range(lengths[i]):
                if (i, t) == NAN_ROW:
                    break
                h, lp = their_token(warped(raw[i, t], **warp), tokens[i, t], top_p, k)
                e_i.append(h)
                l_i.append(lp)
            ent.append(e_i)
            ll.append(l_i)
        entropy_profile.append(ent)
        loglik_profile.append(ll)
    # demo.step3_compute_bf_values
    entropies = [np.array(their_condense(x)).cumsum() for x in entropy_profile]
    logliks = [
        np.array(their_condense(x, prefix_mode=True, divide_by_length=True)) for x in loglik_profile
    ]
    log_bf = [  # compute_bf_values
        -ll[-1] if len(e) > limit else e[-1] / len(e) for e, ll in zip(entropies, logliks)
    ]
    bf = np.exp(log_bf)
    return bf, float(np.mean(bf)), [len(e) for e in entropies]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("branching")
    path = dump_mod.run(
        compose_dump(
            tmp,
            cache_dir,
            [
                "model=tiny-random",
                f"n_samples={S_PER_PROMPT}",
                f"batch_size={S_PER_PROMPT}",
                f"max_new_tokens={T}",
                "codec=fp32",
            ],
        )
    )["archive"]
    rng = np.random.default_rng(7)
    with h5py.File(path, "r+") as f:
        gen = f.attrs["generator"]
        logits = f["models"][gen]["logits"]
        n, _, v = logits.shape
        prompt_index = f["samples"]["prompt_index"][()]
        raw = rng.normal(0.0, 3.0, (n, T, v)).astype(np.float32)
        peaked = rng.random((n, T)) < 0.3  # one token dominates: the rest fall below 1e-12
        raw[peaked, rng.integers(0, v, peaked.sum())] += 40.0
        tokens = np.zeros((n, T), np.int32)
        for i in range(n):
            for t in range(T):
                logp = warped(raw[i, t], **WARP)
                support = np.flatnonzero(np.isfinite(logp))
                ranked = support[np.argsort(-logp[support], kind="stable")]
                # mostly a probable token; sometimes the least probable the warp keeps, which
                # lies outside their nucleus (their code adds it back)
                pick = (
                    ranked[-1]
                    if rng.random() < 0.25
                    else ranked[rng.integers(0, min(3, len(ranked)))]
                )
                tokens[i, t] = pick
        raw[NAN_ROW][5] = np.nan
        lengths = np.array(
            [
                LENGTHS[p][list(np.flatnonzero(prompt_index == p)).index(i)]
                for i, p in enumerate(prompt_index)
            ]
        )
        logits[...] = raw
        f["samples"]["tokens"][...] = tokens
        f["samples"]["length"][...] = lengths
        key = json.loads(f.attrs["run_key"])
        f.attrs["run_key"] = json.dumps({**key, **WARP}, sort_keys=True)
        n_prompts = int(prompt_index.max()) + 1
    assert n_prompts == len(LENGTHS) and n == S_PER_PROMPT * n_prompts
    return path, gen, raw, tokens, lengths, prompt_index, n_prompts


def run_bf(path, tmp, *overrides):
    res = run_analysis(analysis_cfg(tmp, "analysis=entropy", f"archive={path}", *overrides))
    summary = json.loads((tmp / "summary.json").read_text())
    return res, summary


def test_their_bf_with_the_archives_sampling_distribution(planted, tmp_path):
    """Defaults: vLLM 0.7's logprobs (the warped distribution the samples came from), their
    nucleus = the archive's top_p, K = 50, 50 positions: the entropy branch throughout."""
    path, gen, raw, tokens, lengths, prompt_index, n_prompts = planted
    res, s = run_bf(path, tmp_path)
    bf, value, positions = their_bf(
        raw,
        tokens,
        lengths,
        prompt_index,
        n_prompts,
        top_p=WARP["top_p"],
        k=50,
        limit=50,
        warp=WARP,
    )
    assert positions == [10, 4]
    got = s["models"][gen]["branching_factor_yang_holtzman"]
    assert got["value"] == pytest.approx(value, rel=1e-12, abs=0)
    assert got["exp_mean_log_over_prompts"] == pytest.approx(np.exp(np.log(bf).mean()), rel=1e-12)
    assert got["n_prompts"] == 2 and got["n_prompts_undefined"] == 0
    prompts = list(got["per_prompt"])
    for p, text in enumerate(prompts):
        row = got["per_prompt"][text]
        assert row["bf"] == pytest.approx(bf[p], rel=1e-12)
        assert (row["branch"], row["positions"], row["n_completions"]) == (
            "entropy",
            positions[p],
            S_PER_PROMPT,
        )
    assert got["settings"]["distribution_warp"] == WARP and got["settings"]["top_p"] == 0.97
    assert got["on_own_samples"] is True
    lines = "\n".join(terminal_lines(res))
    assert f"Yang & Holtzman's definition: {value:.2f} (mean over 2 prompts)" in lines


NO_WARP = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@pytest.mark.parametrize(
    "overrides, top_p, k, limit, branches",
    [
        # asymptotic_limit=5: prompt 0 (10 positions) takes the mean-NLL branch, prompt 1 (4)
        # stays on the entropy branch; the paper's nucleus 0.9 and a 20-entry table
        (("asymptotic_limit=5", "top_p=0.9", "logprobs=20"), 0.9, 20, 5, ["nll", "entropy"]),
        # nucleus 1 (the engine's default sampling): the table's entries below 1e-12 (all but
        # the top token of the planted peaked rows) are skipped, the token added back
        (("top_p=1.0",), 1.0, 50, 50, ["entropy", "entropy"]),
    ],
)
def test_their_bf_on_the_models_distribution(
    planted, tmp_path, overrides, top_p, k, limit, branches
):
    """distribution=model: vLLM V1's raw log-probabilities (no warp)."""
    path, gen, raw, tokens, lengths, prompt_index, n_prompts = planted
    _, s = run_bf(
        path,
        tmp_path,
        "analysis.yang_holtzman.distribution=model",
        *(f"analysis.yang_holtzman.{o}" for o in overrides),
    )
    bf, value, positions = their_bf(
        raw, tokens, lengths, prompt_index, n_prompts, top_p=top_p, k=k, limit=limit, warp=NO_WARP
    )
    got = s["models"][gen]["branching_factor_yang_holtzman"]
    assert [r["branch"] for r in got["per_prompt"].values()] == branches
    assert [r["positions"] for r in got["per_prompt"].values()] == positions
    assert [r["bf"] for r in got["per_prompt"].values()] == pytest.approx(bf, rel=1e-12)
    assert got["value"] == pytest.approx(value, rel=1e-12, abs=0)
    assert got["settings"]["distribution_warp"] == NO_WARP
    if "nll" in branches:  # the NLL branch is not the entropy branch on these rows
        entropy_only, _, _ = their_bf(
            raw,
            tokens,
            lengths,
            prompt_index,
            n_prompts,
            top_p=top_p,
            k=k,
            limit=50,
            warp=NO_WARP,
        )
        assert abs(entropy_only[0] - bf[0]) > 1e-3 * bf[0]
        assert entropy_only[1] == pytest.approx(bf[1], rel=1e-12)


def test_their_bf_is_undefined_with_three_completions_per_prompt(tiny_archive, tmp_path):
    """Three completions a prompt: their condensing stops at position 0 (their code then
    fails on an empty profile); here the prompts count as undefined and the value is null."""
    _, s = run_bf(tiny_archive, tmp_path)
    got = next(iter(s["models"].values()))["branching_factor_yang_holtzman"]
    assert got["value"] is None and got["n_prompts"] == 0 and got["n_prompts_undefined"] == 2
    assert all(r["branch"] is None for r in got["per_prompt"].values())


@pytest.mark.parametrize(
    "override, word",
    [
        ("analysis.yang_holtzman.distribution=raw", "distribution"),
        ("analysis.yang_holtzman.top_p=1.5", "top_p"),
        ("analysis.yang_holtzman.logprobs=0", "logprobs"),
        ("analysis.yang_holtzman.asymptotic_limit=-1", "asymptotic_limit"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny_archive, tmp_path, override, word):
    from engine.errors import EngineError

    with pytest.raises(EngineError, match=word):
        run_bf(tiny_archive, tmp_path, override)
