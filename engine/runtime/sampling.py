"""The engine's own sampling loop: batched, KV-cached decoding through a TransformerBridge,
with the raw next-token logits of every step captured by a hook.

The hook on `unembed.hook_out` sees the unembedding output [batch, pos, vocab]; the loop keeps
the last position, i.e. the raw logits *before* temperature, top-k or top-p.  Optional extra
hook points (e.g. `blocks.5.hook_resid_post`) are captured the same way.  One step's tensors
are handed to the caller (who moves them off the accelerator) before the next forward, so
memory does not grow with the number of steps or samples.

Each distinct prompt of a batch is read once (full-vocabulary logits only at its last
position: `logits_to_keep=1`) and its KV cache repeated over the rows that continue it.  A batch
of one prompt needs no padding or attention mask.  A batch of several prompts (the schedule's
`across` grid, `engine.runtime.schedule`) reads them left-padded to the longest, with an
attention mask over the pads and each row's own position ids (prompt length + step), so a
row's logits are its unbatched forward's up to rounding (the run self-check bounds them).

The KV cache is the loop's own object (`new_cache`), handed to every forward under the name
the model's forward takes (`cache_keyword`) and extended by HuggingFace in place; the loop
never depends on where a release returns it (transformers 5.24 moved it from
`output.past_key_values` to `output.cache`, which TransformerLens 4.3's bridge does not read,
and a loop that used the returned cache decoded every step without its context).  After every
forward the cache must hold exactly prompt + steps-so-far positions (`check_cache`), or the run
stops with one line naming the library versions: decoding without context is never silent.
The cache is a `DynamicCache` built from the model's config (attention layers, full or sliding
window); a hybrid or state-space model whose forward needs another cache class stops there too.

Reproducibility: every sample has its own seed (`sample_seed(seed, index)`) and its own CPU
`torch.Generator`; each step draws one float64 uniform per row on the CPU (one [batch] vector,
one copy to the device), so a sample's tokens depend on its logits alone: not on the batch it
was in, and not on the device (CUDA's Philox and the CPU's MT19937 would give other numbers
from the same seed).  The logits themselves can differ in their last bits across devices,
dtypes and batch sizes (README, "GPUs").

Non-finite logits (NaN, +inf, or a row without any finite entry; -inf entries alone are masked
tokens) are never sampled: `on_nonfinite="fail"` raises `NonFiniteLogits`, `"record"` ends
the row before that step and flags it in `Step.nonfinite`.

Host syncs: one per step (the tokens and non-finite flags, copied together), which decides
when every row has ended.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.errors import EngineError
from engine.runtime.provenance import package_versions

LOGITS_HOOK = "unembed.hook_out"
ON_NONFINITE = ("fail", "record")


@dataclass
class Step:
    t: int  # step index: these logits predict generated token t
    logits: torch.Tensor  # [batch, vocab] raw next-token logits, on the model's device
    acts: dict  # hook name -> [batch, d] activation at the last position
    tokens: np.ndarray  # [batch] int64 token of this step (host)
    alive: np.ndarray  # [batch] bool: the sample had not ended before this step (host)
    nonfinite: np.ndarray | None = None  # [batch] bool: the row ends here, logits non-finite
    #: archive dataset (relative to the model group) -> [batch, ...] tensor computed from this
    #: step (the lens statistics: `engine.runtime.lens`)
    extras: dict = field(default_factory=dict)


class NonFiniteLogits(EngineError):
    """A row's logits held NaN or +inf, or no finite entry, at step `step`."""

    def __init__(self, rows: list[int], step: int):
        super().__init__(
            f"non-finite logits (NaN, +inf or no finite entry) in batch rows {rows} at step {step}"
        )
        self.rows, self.step = rows, step


def sample_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed of sample `index` of a run seeded with `seed`."""
    return int(
        np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
        >> np.uint64(1)
    )


def new_cache(bridge):
    """An empty HuggingFace `DynamicCache` for the bridge's model (its config decides the
    layer kinds, e.g. sliding-window layers)."""
    from transformers import DynamicCache

    return DynamicCache(config=bridge.original_model.config)


def cache_keyword(bridge) -> str:
    """The keyword under which the model's forward takes its KV cache: `cache` from
    transformers 5.24 on, `past_key_values` before (5.24 still accepts that name through a
    deprecation shim, with a warning per call)."""
    params = inspect.signature(bridge.original_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def library_versions() -> str:
    """`transformers X, transformer-lens Y`: what a cache failure depends on."""
    v = package_versions()
    return f"transformers {v['transformers']}, transformer-lens {v['transformer-lens']}"


class StaleCache(EngineError):
    """The KV cache did not advance with the decoded tokens: the model would continue without
    its context."""


def check_cache(cache, expected: int, step: int) -> None:
    """Every layer of the cache holds `expected` positions (prompt + tokens fed so far; a
    sliding-window layer counts all it has seen), else `StaleCache`."""
    held = sorted({int(layer.get_seq_length()) for layer in cache.layers}) or [0]
    if held != [expected]:
        raise StaleCache(
            f"the KV cache holds {'/'.join(map(str, held))} positions after step "
            f"{step}, expected "
            f"{expected}: the model would decode without its context "
            f"({library_versions()}; the lock pins a tested pair: make setup)"
        )


def check_hooks(bridge, names: Sequence[str]) -> None:
    known = bridge.hook_dict
    bad = [n for n in names if n not in known]
    if bad:
        block0 = [n for n in known if n.startswith("blocks.0.")]
        # the residual stream first (what people capture most), then the rest of block 0
        first = [n for n in block0 if "resid" in n] + [n for n in block0 if "resid" not in n]
        raise EngineError(
            f"unknown hook point(s) {bad}; block 0 has: {', '.join(first[:8])}, "
            f"... ({len(known)} hook points in all)"
        )


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


def uniforms(gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) float64 per row from each row's own CPU generator: [batch] on the CPU."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])


def draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of logits `x` [batch, vocab] by inverse-CDF sampling with the row's
    uniform `u` [batch] (from `uniforms`, any device): token = first index whose cumulative
    probability exceeds u (right=True never picks a zero-probability token).  The CDF is
    float64 so its rounding (~1e-16 per step) is far below any token's probability."""
    if x.device.type == "cuda" and u.device.type == "cpu":
        u = u.pin_memory()
    u = u.to(x.device, non_blocking=True)
    cdf = torch.softmax(x, dim=-1).double().cumsum(dim=-1)  # [batch, vocab]
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=x.shape[-1] - 1)


def input_device(bridge) -> torch.device:
    """Where token ids go in (the embedding's device; with device_map the logits may come out
    on another GPU)."""
    return next(bridge.parameters()).device


def prompt_groups(prompt_ids, n: int) -> list[tuple[list[int], int]]:
    """(prompt, rows) of each run of consecutive rows reading the same prompt: `prompt_ids` is
    one prompt for all n rows (a sequence of ints) or one prompt per row."""
    if len(prompt_ids) == 0 or isinstance(prompt_ids[0], (int, np.integer)):
        return [([int(i) for i in prompt_ids], n)]
    if len(prompt_ids) != n:
        raise ValueError(f"{len(prompt_ids)} row prompts for {n} rows")
    groups: list[tuple[list[int], int]] = []
    for ids in prompt_ids:
        ids = [int(i) for i in ids]
        if groups and groups[-1][0] == ids:
            groups[-1] = (ids, groups[-1][1] + 1)
        else:
            groups.append((ids, 1))
    return groups


def row_prompt(groups: list[tuple[list[int], int]], i: int) -> list[int]:
    """The prompt of row i of a batch whose rows are `groups` (`prompt_groups`)."""
    return groups[int(np.searchsorted(np.cumsum([c for _, c in groups]), i, side="right"))][0]


def generate(
    bridge,
    prompt_ids,
    seeds: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    capture: Sequence[str] = (),
    on_nonfinite: str = "fail",
) -> Iterator[Step]:
    """Sample len(seeds) continuations, yielding one `Step` per generated step.  `prompt_ids`:
    one prompt (a sequence of token ids) that every row continues, or one prompt per row.

    Rows of one prompt share its KV cache (read once, repeated), so with a single prompt no
    padding or attention mask is needed and every row's numerics equal an unbatched forward.
    Several prompts are read left-padded and masked (module docstring).  Rows that emitted an
    EOS keep being fed (their outputs are marked dead in `Step.alive`); the loop stops when
    all rows have ended.
    """
    if on_nonfinite not in ON_NONFINITE:
        raise EngineError(
            f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}"
        )
    n = len(seeds)
    if n == 0 or max_new_tokens == 0:
        return
    groups = prompt_groups(prompt_ids, n)
    check_hooks(bridge, capture)
    device = input_device(bridge)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]  # CPU: device-independent
    eos = np.asarray(sorted(set(eos_ids)), dtype=np.int64)
    tap: dict[str, torch.Tensor] = {}

    def keep_last(name):  # keyed by the requested name: aliases report their canonical one
        def hook(tensor, hook):
            tap[name] = tensor[:, -1].detach()
            return tensor

        return hook

    hooks = [(name, keep_last(name)) for name in (LOGITS_HOOK, *capture)]
    width = max(len(ids) for ids, _ in groups)  # the prompts' positions, left-padded
    ids = torch.tensor(
        [[0] * (width - len(p)) + p for p, _ in groups], dtype=torch.long, device=device
    )  # [prompt, pos]
    padded = len(groups) > 1
    if padded:  # a pad's id is never read: its key is masked and its output unused
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p, _ in groups], device=device
        )  # [prompt, pos]
        # position ids where the model's forward takes them (a model that derives its own
        # from the mask, or takes none, gets the mask alone)
        positions = "position_ids" in inspect.signature(bridge.original_model.forward).parameters
        where = dict(attention_mask=mask)
        if positions:
            where["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        row_of = torch.repeat_interleave(
            torch.arange(len(groups), device=device),
            torch.tensor([c for _, c in groups], device=device),
        )  # [batch] -> its prompt
        mask, length = mask[row_of], torch.tensor([len(p) for p, _ in groups], device=device)
        length = length[row_of]  # [batch] each row's prompt length: its next position
    else:
        where = {}
    finished = np.zeros(n, dtype=bool)
    cache, kw = new_cache(bridge), cache_keyword(bridge)
    with torch.inference_mode(), bridge.hooks(fwd_hooks=hooks):
        # use_cache=True whatever the model's config says: a trainer may have saved it as
        # False (TRL does), and the KV cache is what carries the context between steps
        bridge(ids, return_type=None, use_cache=True, logits_to_keep=1, **where, **{kw: cache})
        check_cache(cache, width, 0)
        if padded:  # each prompt's keys and values, once per row that continues it
            cache.batch_select_indices(row_of)
            rows = {k: v[row_of] for k, v in tap.items()}
        else:
            if n > 1:
                cache.batch_repeat_interleave(n)  # the prompt's keys and values, once per row
            rows = {k: v.expand(n, *v.shape[1:]) for k, v in tap.items()}  # [batch, ...] views
        for t in range(max_new_tokens):
            logits = rows[LOGITS_HOOK]  # [batch, vocab]
            tokens = draw(warp(logits, temperature, top_k, top_p), uniforms(gens))  # [batch]
            bad = ~torch.isfinite(logits.amax(dim=-1))  # NaN, +inf, or nothing finite
            host = torch.stack([tokens, bad.long()]).cpu().numpy()  # the step's one sync
            tok, bad_h = host[0], host[1].astype(bool)
            new_bad = bad_h & ~finished
            if new_bad.any() and on_nonfinite == "fail":
                raise NonFiniteLogits(np.flatnonzero(new_bad).tolist(), t)
            yield Step(t, logits, {k: rows[k] for k in capture}, tok, ~finished & ~bad_h, new_bad)
            finished |= np.isin(tok, eos) | bad_h
            if finished.all() or t + 1 == max_new_tokens:
                break
            if padded:  # the fed token sits at position prompt length + t in its own row
                mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
                where = dict(attention_mask=mask)
                if positions:
                    where["position_ids"] = (length + t)[:, None]
            bridge(
                tokens[:, None].to(device), return_type=None, use_cache=True, **where, **{kw: cache}
            )
            check_cache(cache, width + t + 1, t + 1)
            rows = tap


def forward_logits(
    bridge, ids: torch.Tensor, keep: int = 0, capture: Sequence[str] = ()
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Teacher-forced logits [batch, pos, vocab] of token ids [batch, pos], read at the same
    hook point as `generate` (so permanent hooks such as tempering apply identically); with
    keep=k only the last k positions are unembedded: [batch, k, vocab].  With `capture`:
    (logits, {hook: [batch, k, ...] activations at the same positions})."""
    tap: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(tensor, hook):
            tap[name] = tensor.detach() if name == LOGITS_HOOK or not keep else tensor[:, -keep:]
            return tensor

        return hook

    check_hooks(bridge, capture)
    fwd = [(name, hook_for(name)) for name in (LOGITS_HOOK, *capture)]
    with torch.inference_mode(), bridge.hooks(fwd_hooks=fwd):
        bridge(ids, return_type=None, logits_to_keep=keep)
    if capture:
        return tap[LOGITS_HOOK], {name: tap[name] for name in capture}
    return tap[LOGITS_HOOK]
