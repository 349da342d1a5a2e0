"""Yang & Holtzman's branching factor (BF), as their published code computes it.

Yang, Li & Holtzman, "LLM Probability Concentration: How Alignment Shrinks the Generative
Horizon" (TMLR 2026; arXiv 2025 as "How Alignment Shrinks the Generative Horizon"); code:
github.com/yangalan123/LLMBranchingFactor, read at commit 237d78f.  What follows is what the
*code* does, which is more specific than the paper's "exp of the mean per-token entropy":

1. Per generated token (`uncertainty_quantification/loglik_computation.py`,
   `get_tokenwise_entropy_from_vllm_outputs` -> `get_token_truncated_dist_from_vllm_outputs`
   with `top_p_mode=True` -> `get_truncated_dist_top_p`): not the full-vocabulary entropy.
   vLLM returns a table of the K = `logprobs` (50) most probable tokens' log-probabilities plus
   the sampled token's; entries that are -inf or below `tolerance_inf` = 1e-12 (`consts.py`)
   are skipped, the rest are taken in descending order until their cumulative probability
   reaches `top_p` (the same `--top_p` the samples were drawn with, 0.9 in the paper's runs);
   the sampled token is added if it is not among them; the kept log-probabilities are
   renormalised (softmax) and H = -sum q log q, in nats.  The per-token log-likelihood
   (`get_tokenwise_logprob_from_vllm_outputs(..., top_p=...)`, the profile's
   `output_per_token_logprob_truncated`) is log q(sampled token) under that same truncated,
   renormalised distribution.  Their requirements pin vllm 0.7.3, whose default (V0) sampler
   returns the log-probabilities of the distribution it sampled from (after temperature,
   top-k, top-p: `vllm/model_executor/layers/sampler.py`, `Sampler.forward`), so with
   top_p < 1 the nucleus is taken twice (`distribution="sampling"` here); vLLM's V1 sampler
   returns the model's raw ones by default (`distribution="model"`).
2. Per prompt (`common_utils.condense_arrays_with_inconsistent_lengths`, defaults): the
   samples' per-token values are pooled **per position** (the mean at position i over the
   samples at least i + 1 tokens long), for i below int(0.95-quantile of the sample lengths),
   stopping at the first position that three or fewer samples reach.  The log-likelihoods are
   condensed the same way with `prefix_mode=True, divide_by_length=True`: at position i, the
   mean over those samples of their mean log-likelihood over tokens 0..i.
3. log BF of the prompt (`uncertainty_computation.compute_bf_values`, fed with the cumulative
   sum of the condensed entropies as `demo/demo.py` `step3_compute_bf_values` and
   `uncertainty_computation.accumulate_entropy_and_loglik_from_profile` do): with L the number
   of condensed positions, the mean of the L per-position mean entropies if L <=
   `asymptotic_limit` (50, `DEFAULT_ASYMPTOTIC_LIMIT`), else minus the last condensed
   log-likelihood (the mean NLL of the first L tokens, over the samples that reach L).  The
   cut-off counts generated (output) positions after condensing; the prompt is not counted.
4. Over prompts: BF = exp(log BF) per prompt and the arithmetic mean of those BFs
   (`demo.step3_compute_bf_values`: `np.exp(bf_values)`, `np.mean`; likewise
   `compute_overall_bf_from_profile`).  One plotting script,
   `uncertainty_quantification/plot_closeness_loglik_entropy.py` `compute_bf_values_dict`,
   takes exp(mean log BF) instead; both are reported.

Where their code would stop with an error (a prompt whose first position three or fewer
samples reach: an empty profile, `entropy[-1]` fails), the prompt's BF is undefined (NaN)
here, left out of the mean and counted.  Their float32 softmax (`torch.tensor` of Python
floats) is float64 here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError

#: uncertainty_computation.DEFAULT_ASYMPTOTIC_LIMIT (and demo.step3_compute_bf_values's default)
ASYMPTOTIC_LIMIT = 50
#: consts.tolerance_inf: table entries less probable than this are skipped
TOLERANCE = 1e-12
#: condense_arrays_with_inconsistent_lengths(q=0.95): positions below int(quantile(lengths, q))
QUANTILE = 0.95
#: condense_arrays_with_inconsistent_lengths stops where `len(elements) <= 3`
MIN_SAMPLES = 4
DISTRIBUTIONS = ("sampling", "model")


@dataclass(frozen=True)
class Settings:
    """What decides the per-token terms.

    temperature, top_k, sampling_top_p: the warp from the stored (raw) logits to the
        distribution whose log-probabilities vLLM reports (identity for `distribution="model"`).
    top_p: their truncation's nucleus (`get_truncated_dist_top_p`).
    logprobs: K of vLLM's `logprobs=K` table."""

    temperature: float = 1.0
    top_k: int = 0
    sampling_top_p: float = 1.0
    top_p: float = 1.0
    logprobs: int = 50

    @classmethod
    def from_config(cls, c, sampling: dict) -> Settings:
        """From the analysis config's `yang_holtzman` node and the archive's sampling settings
        (`temperature`, `top_k`, `top_p` of its run key)."""
        if c.distribution not in DISTRIBUTIONS:
            raise EngineError(
                f"yang_holtzman.distribution must be one of {', '.join(DISTRIBUTIONS)}, "
                f"got {c.distribution!r}"
            )
        if not (isinstance(c.logprobs, int) and c.logprobs >= 1):
            raise EngineError(f"yang_holtzman.logprobs must be an integer >= 1, got {c.logprobs!r}")
        top_p = sampling["top_p"] if c.top_p is None else c.top_p
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise EngineError(f"yang_holtzman.top_p must be in (0, 1] or null, got {top_p!r}")
        if c.distribution == "model":
            return cls(top_p=float(top_p), logprobs=int(c.logprobs))
        return cls(
            float(sampling["temperature"]),
            int(sampling["top_k"]),
            float(sampling["top_p"]),
            float(top_p),
            int(c.logprobs),
        )


def check_limit(limit) -> int:
    if not (isinstance(limit, int) and limit >= 0):
        raise EngineError(f"yang_holtzman.asymptotic_limit must be an integer >= 0, got {limit!r}")
    return limit


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(x - m[:, None]).sum(-1))


def reported_logprobs(x: np.ndarray, s: Settings) -> np.ndarray:
    """float64 [rows, vocab]: log-probabilities of the distribution the rows' tokens are drawn
    from, as the engine warps raw logits (`engine/runtime/sampling.py` `warp`: temperature,
    then top-k keeping ties, then dropping a token when the mass strictly before it already
    reaches top_p); warped-out tokens are -inf."""
    x = np.asarray(x, np.float64) / s.temperature
    v = x.shape[-1]
    if s.top_k and s.top_k < v:
        kth = np.partition(x, v - s.top_k, axis=-1)[:, v - s.top_k]
        x = np.where(x < kth[:, None], -np.inf, x)
    if s.sampling_top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        xs = np.take_along_axis(x, order, -1)
        p = np.exp(xs - _logsumexp(xs)[:, None])
        drop_sorted = (np.cumsum(p, -1) - p) >= s.sampling_top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        x = np.where(drop, -np.inf, x)
    return x - _logsumexp(x)[:, None]


def token_terms(x: np.ndarray, tokens: np.ndarray, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Per row of logits `x` [rows, vocab] (float; decoded) with its sampled token: the entropy
    (nats) of their truncated, renormalised distribution and the log-probability of the token
    under it (step 1 of the module docstring).  0 log 0 = 0 where the token itself has
    probability 0 (only a scored group under a top-k/top-p warp can have that; their torch
    arithmetic gives NaN there)."""
    logp = reported_logprobs(x, s)
    n, v = logp.shape
    tokens = np.asarray(tokens, np.int64)
    k = min(s.logprobs, v)
    idx = np.argpartition(-logp, k - 1, axis=-1)[:, :k]  # vLLM's table: the K most probable
    vals = np.take_along_axis(logp, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")  # get_truncated_dist_top_p's sort
    idx, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
    p = np.exp(vals)
    valid = np.isfinite(vals) & (p >= TOLERANCE)  # `np.isinf(value) or exp < tol`: continue
    run = np.cumsum(np.where(valid, p, 0.0), -1)  # their running sum, in their order
    before = np.concatenate([np.zeros((n, 1)), run[:, :-1]], -1)
    kept = valid & (before < s.top_p)  # taken until the running sum reaches top_p: break
    tok = logp[np.arange(n), tokens]
    missing = ~(kept & (idx == tokens[:, None])).any(-1)  # the "or" part: add the token
    vals = np.concatenate(
        [np.where(kept, vals, -np.inf), np.where(missing, tok, -np.inf)[:, None]], -1
    )
    lq = vals - _logsumexp(vals)[:, None]
    q = np.exp(lq)
    h = -(q * np.where(q > 0, lq, 0.0)).sum(-1)
    return h, tok - _logsumexp(vals)


def condense(
    per_sample: list[np.ndarray], prefix_mode: bool = False, divide_by_length: bool = False
) -> np.ndarray:
    """`condense_arrays_with_inconsistent_lengths` with its defaults (reduce_fn=np.mean,
    q=0.95): per position i < int(quantile(lengths, 0.95)), the mean over the samples at least
    i + 1 long of x[i] (prefix_mode: of sum x[:i+1]; divide_by_length: divided by i + 1),
    stopping at the first position three or fewer samples reach."""
    if not per_sample:
        return np.empty(0)
    lengths = [len(x) for x in per_sample]
    sums = [np.cumsum(x) for x in per_sample]
    out = []
    for i in range(int(np.quantile(lengths, QUANTILE))):
        src = sums if prefix_mode else per_sample
        at = np.array([y[i] for x, y in zip(per_sample, src) if len(x) >= i + 1], np.float64)
        if divide_by_length:
            at = at / (i + 1)
        if len(at) < MIN_SAMPLES:
            break
        out.append(at.mean())
    return np.array(out, np.float64)


def prompt_log_bf(
    entropies: list[np.ndarray], logprobs: list[np.ndarray], limit: int
) -> tuple[float, str | None, int]:
    """(log BF, branch "entropy" | "nll" | None, condensed positions L) of one prompt's
    samples (`compute_bf_values` on the condensed, cumulated profiles)."""
    h = np.cumsum(condense(entropies))
    n = len(h)
    if n == 0:  # their code fails here (entropy[-1] of an empty profile)
        return float("nan"), None, 0
    if n > limit:
        return float(-condense(logprobs, prefix_mode=True, divide_by_length=True)[-1]), "nll", n
    return float(h[-1] / n), "entropy", n


def by_sample(values: np.ndarray, sample: np.ndarray, step: np.ndarray, stop: np.ndarray, n: int):
    """Per sample 0..n-1, its values in step order up to (not including) its first `stop` row
    (a stored row with non-finite logits: the sample ends there, as `on_nonfinite=record`
    would have ended it)."""
    out = [[] for _ in range(n)]
    for i in np.lexsort((step, sample)):
        out[sample[i]].append((step[i], values[i], stop[i]))
    seqs = []
    for rows in out:
        vals = []
        for t, v, bad in rows:
            if bad or t != len(vals):
                break
            vals.append(v)
        seqs.append(np.array(vals, np.float64))
    return seqs


def yang_holtzman(h, lp, sample, step, stop, prompt_of_sample, prompts, limit: int) -> dict:
    """Their BF per prompt and over prompts from per-row terms (`token_terms`) of samples
    0..len(prompt_of_sample)-1."""
    n = len(prompt_of_sample)
    hs, lps = by_sample(h, sample, step, stop, n), by_sample(lp, sample, step, stop, n)
    per_prompt, logs = {}, []
    for p, text in enumerate(prompts):
        sel = [i for i in range(n) if prompt_of_sample[i] == p]
        log_bf, branch, positions = prompt_log_bf(
            [hs[i] for i in sel], [lps[i] for i in sel], limit
        )
        per_prompt[text] = {
            "bf": float(np.exp(log_bf)),
            "log_bf": log_bf,
            "branch": branch,
            "positions": positions,
            "n_completions": len(sel),
        }
        logs.append(log_bf)
    logs = np.array(logs, np.float64)
    ok = ~np.isnan(logs)
    return {
        "value": float(np.exp(logs[ok]).mean()) if ok.any() else float("nan"),
        "exp_mean_log_over_prompts": float(np.exp(logs[ok].mean())) if ok.any() else float("nan"),
        "n_prompts": int(ok.sum()),
        "n_prompts_undefined": int((~ok).sum()),
        "per_prompt": per_prompt,
    }
