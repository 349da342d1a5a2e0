"""The run's self-check: one stored sample against one teacher-forced forward.

After the first committed batch of every run that samples or enumerates (`dump`, `perturb`,
`answers`; `score` is a teacher-forced forward itself) the runtime teacher-forces one sample
of that batch (the longest: prompt + its stored tokens, batch 1, one forward) and compares
the log-probabilities with the rows just stored, decoded from the file.  The two are the
same model on the same tokens, so they differ only by

- the codec (docs/archive-format.md, "Codecs": `codecs.worst_case_error`; the log-softmax
  moves a raw-logit codec's error by at most twice that), and
- rounding: cached step-by-step decoding in a batch and one [1, prompt + L] forward reduce in
  other orders (`ROUNDING`: a fraction of the largest |logit|, by the precision the matmuls
  really ran at).

Anything beyond that bound means the stored rows are not the model's distributions on the
stored tokens (a cache that lost its context, a hook on the wrong position, a codec bug); the
run stops with one line, the partial stays and nothing is renamed.  The measured maximum and the
bound go into the model group's `self_check` attribute either way, so `inspect`, `pair` and the
report show how close every archive came.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.archive import codecs
from engine.archive import format as F
from engine.errors import EngineError
from engine.runtime.sampling import forward_logits, input_device, library_versions
from kernels.reference import log_softmax

#: allowed rounding difference between the two forwards, as a fraction of the largest |logit|,
#: by the precision the matmuls run at: 2**11 units in the last place for float32 (measured,
#: CPU: SmolLM2-135M 7.6e-5 nats at |logit| ~36, ~20 ulps; tiny-random 8e-6; GPUs pick other
#: kernels per batch shape), 2**5 ulps for float16 and TF32, 2**4 for bfloat16 (measured:
#: SmolLM2-135M in bfloat16 on the CPU, 1.35 nats at |logit| ~31, i.e. 2**-4.5 of it).  A
#: decode without its context differs by nats (up to 32 seen).  float64 models take float32's.
ROUNDING = {
    "float64": 2.0**-12,
    "float32": 2.0**-12,
    "tf32": 2.0**-5,
    "float16": 2.0**-5,
    "bfloat16": 2.0**-3,
}
#: steps compared at a time (host memory: a few float64 [BLOCK, vocab] arrays)
BLOCK = 32


@dataclass(frozen=True)
class SelfCheck:
    sample: int  # the archive's sample index (this file's)
    steps: int  # steps compared
    max_abs_diff: float  # max |log p_stored - log p_teacher_forced| over steps and vocabulary
    bound: float  # codec + rounding bound (nats)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound


def precision(provenance: dict) -> str:
    """The precision of the logits' matmuls: the model's dtype, or TF32 where a CUDA float32
    model runs with TF32 allowed (matmul precision other than `highest`)."""
    dtype = str(provenance.get("dtype", "float32"))
    if (
        dtype == "float32"
        and str(provenance.get("device", "cpu")).startswith("cuda")
        and provenance.get("matmul_precision", "highest") != "highest"
    ):
        return "tf32"
    return dtype


def bound(codec: str, window: float, max_abs: float, prec: str) -> float:
    """Largest |Δ log p| the codec and the two forwards' rounding allow (nats)."""
    if prec not in ROUNDING:
        raise EngineError(
            f"self-check: no rounding bound for model dtype {prec!r} (known: {', '.join(ROUNDING)})"
        )
    rounding = ROUNDING[prec] * max_abs
    err = float(codecs.worst_case_error(codec, max_abs, window))
    return (err if codec == "q16" else 2 * err) + rounding  # q16 stores log-probs already


def stored_logprobs(group, sample: int, steps: slice) -> np.ndarray:
    """The stored rows of `sample` at `steps` as float64 log-probabilities [step, vocab] (q16
    rows are log-probs already; others go through a log-softmax)."""
    ds = group["logits"]
    codec = str(ds.attrs["codec"])
    data = ds[sample, steps]
    if codec == "q16":
        x = codecs.decode(
            codec, data, group[F.LOGITS_SCALE][sample, steps], group[F.LOGITS_OFFSET][sample, steps]
        )
        return x.astype(np.float64)
    return log_softmax(codecs.decode(codec, data))


def max_abs_diff(stored: np.ndarray, forced: np.ndarray, floor: np.ndarray | None) -> float:
    """max |stored - forced| over entries [step, vocab]; masked tokens (-inf in both) match,
    -inf in one only is an infinite difference.  For q16, `floor` [step] is each row's lowest
    code (the window's bottom): teacher-forced values below it are compared as the floor, since
    the codec clamps them there."""
    if floor is not None:
        forced = np.maximum(forced, floor[:, None])
    both_inf = np.isneginf(stored) & np.isneginf(forced)
    with np.errstate(invalid="ignore"):
        d = np.abs(np.where(both_inf, 0.0, stored - forced))
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max(initial=0.0))


def run_check(
    lm, group, sample: int, prompt_ids, tokens: np.ndarray, steps: int, window: float
) -> SelfCheck:
    """Teacher-force `sample` (prompt + its first `steps` stored tokens) and compare with the
    group's stored rows, BLOCK steps at a time (host memory stays a few [BLOCK, vocab])."""
    t0 = time.perf_counter()
    ids = torch.tensor(
        [list(prompt_ids) + [int(t) for t in tokens[:steps]]],
        dtype=torch.long,
        device=input_device(lm.bridge),
    )
    try:
        logits = forward_logits(lm.bridge, ids, keep=steps + 1)[0, :steps]  # [step, vocab]
    except torch.cuda.OutOfMemoryError:
        raise EngineError(
            f"the self-check's teacher-forced forward over {ids.shape[1]} "
            f"positions does not fit in GPU memory; lower max_new_tokens"
        ) from None
    codec = str(group["logits"].attrs["codec"])
    prec = precision(lm.provenance)
    worst, max_abs = 0.0, 1.0
    for b0 in range(0, steps, BLOCK):
        span = slice(b0, min(b0 + BLOCK, steps))
        raw = logits[span].float().cpu().numpy()  # [block, vocab]
        finite = np.abs(raw[np.isfinite(raw)])
        max_abs = max(max_abs, float(finite.max(initial=0.0)))
        floor = group[F.LOGITS_OFFSET][sample, span].astype(np.float64) if codec == "q16" else None
        worst = max(
            worst, max_abs_diff(stored_logprobs(group, sample, span), log_softmax(raw), floor)
        )
    return SelfCheck(
        sample, steps, worst, bound(codec, window, max_abs, prec), time.perf_counter() - t0
    )


def enforce(check: SelfCheck, key: str, partial) -> None:
    """Stop the run with one line when the check failed (the partial stays, not renamed)."""
    if not check.ok:
        raise EngineError(
            f"self-check failed: model {key}'s stored rows of sample {check.sample} differ from "
            f"a teacher-forced forward over its prompt and {check.steps} stored tokens by "
            f"{check.max_abs_diff:.3g} nats (bound {check.bound:.3g}); the archive is not the "
            f"model's distribution on its tokens ({library_versions()}, torch "
            f"{torch.__version__}); {partial} is kept for inspection, nothing was renamed"
        )
