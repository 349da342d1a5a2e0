"""The engine's own sampling loop: batched, KV-cached decoding through a TransformerBridge,
with the raw next-token logits of every step captured by a hook.

The hook on `unembed.hook_out` sees the unembedding output [batch, pos, vocab]; the loop keeps
the last position, i.e. the raw logits *before* temperature, top-k or top-p.  Optional extra
hook points (e.g. `blocks.5.hook_resid_post`) are captured the same way.  One step's tensors
are handed to the caller (who moves them off the accelerator) before the next forward, so
memory does not grow with the number of steps or samples.

Every sample has its own seed (`sample_seed(seed, index)`) and its own torch.Generator, so a
sample's tokens do not depend on which batch it was in, and an interrupted run resumes with
the same samples it would have produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from engine.errors import EngineError

LOGITS_HOOK = "unembed.hook_out"


@dataclass
class Step:
    t: int  # step index: these logits predict generated token t
    logits: torch.Tensor  # [batch, vocab] raw next-token logits, on the model's device
    acts: dict  # hook name -> [batch, d] activation at the last position
    tokens: torch.Tensor  # [batch] token sampled at this step
    alive: torch.Tensor  # [batch] bool: the sample had not ended before this step


def sample_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed of sample `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def check_hooks(bridge, names: Sequence[str]) -> None:
    known = bridge.hook_dict
    bad = [n for n in names if n not in known]
    if bad:
        block0 = [n for n in known if n.startswith("blocks.0.")]
        # the residual stream first (what people capture most), then the rest of block 0
        first = [n for n in block0 if "resid" in n] + [n for n in block0 if "resid" not in n]
        raise EngineError(f"unknown hook point(s) {bad}; block 0 has: {', '.join(first[:8])}, "
                          f"... ({len(known)} hook points in all)")


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution's logits [batch, vocab] in float32: temperature, then top-k,
    then nucleus (top-p) filtering; filtered entries are -inf."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -torch.inf)
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, -torch.inf)
    return x


def draw(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of logits `x` [batch, vocab] by inverse-CDF sampling, each row with
    its own generator: u ~ U[0, 1) per row, token = first index whose cumulative probability
    exceeds u (right=True never picks a zero-probability token).  The CDF is float64 so its
    rounding (~1e-16 per step) is far below any token's probability."""
    u = torch.stack([torch.rand((), generator=g, device=x.device, dtype=torch.float64)
                     for g in gens])  # [batch]
    cdf = torch.softmax(x, dim=-1).double().cumsum(dim=-1)  # [batch, vocab]
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=x.shape[-1] - 1)


def generate(bridge, prompt_ids: Sequence[int], seeds: Sequence[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_ids: Sequence[int] = (), capture: Sequence[str] = ()) -> Iterator[Step]:
    """Sample len(seeds) continuations of one prompt, yielding one `Step` per generated step.

    All rows share the prompt, so no padding or attention mask is needed and every row's
    numerics equal an unbatched forward.  Rows that emitted an EOS keep being fed (their
    outputs are marked dead in `Step.alive`); the loop stops when all rows have ended.
    """
    device = next(bridge.parameters()).device
    n = len(seeds)
    if n == 0 or max_new_tokens == 0:
        return
    check_hooks(bridge, capture)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    tap: dict[str, torch.Tensor] = {}

    def keep_last(name):  # keyed by the requested name: aliases report their canonical one
        def hook(tensor, hook):
            tap[name] = tensor[:, -1].detach()
            return tensor
        return hook

    hooks = [(name, keep_last(name)) for name in (LOGITS_HOOK, *capture)]
    ids = torch.tensor([list(prompt_ids)] * n, dtype=torch.long, device=device)  # [batch, pos]
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    with torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        # use_cache=True whatever the model's config says: a trainer may have saved it as
        # False (TRL does), and the KV cache is what carries the context between steps
        _, cache = bridge(ids, return_type="logits_and_cache", use_cache=True)
        for t in range(max_new_tokens):
            logits = tap[LOGITS_HOOK]  # [batch, vocab]
            tokens = draw(warp(logits, temperature, top_k, top_p), gens)  # [batch]
            yield Step(t, logits, {k: tap[k] for k in capture}, tokens, ~finished)
            finished = finished | torch.isin(tokens, eos)
            if bool(finished.all()) or t + 1 == max_new_tokens:
                break
            _, cache = bridge(tokens[:, None], return_type="logits_and_cache",
                              past_key_values=cache)


def forward_logits(bridge, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [batch, pos, vocab] of token ids [batch, pos], read at the same
    hook point as `generate` (so permanent hooks such as tempering apply identically)."""
    tap: dict[str, torch.Tensor] = {}

    def keep(tensor, hook):
        tap["logits"] = tensor.detach()
        return tensor

    with torch.inference_mode(), bridge.hooks(fwd_hooks=[(LOGITS_HOOK, keep)]):
        bridge(ids, return_type=None)
    return tap["logits"]
