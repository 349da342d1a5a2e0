"""The logit lens at run time: at every stored step, each chosen block's residual stream read
through the model's own final norm and unembedding, reduced on the device by
`kernels.lens.lens_stats` to a few numbers per [sample, step, layer] (never stored as rows).

Layer l is the output of block l (`blocks.{l}.hook_resid_post`, captured at the step's
position by the sampling or teacher-forcing forward).  The lens calls HuggingFace's own
final-norm and unembedding modules (`bridge.ln_final.original_component`,
`bridge.unembed.original_component`), not the bridge's wrappers, so that no hook fires: a
capture hook would be overwritten and a tempered twin's permanent hook (its logits times
gamma) would apply to every layer.  The tempered twin multiplies only its final logits, so its
intermediate lenses are its base model's.

The last block's lens *is* the model's output: its row of the stored statistics is computed
from the step's own logits.  Invariant, checked on every batch: that block's lens recomputed
from its residual stream (times gamma for a tempered twin: the one transform after the
unembedding this engine applies) equals the step's logits within `bound` (a few units in the
last place of the model's dtype, times the row's largest |logit|: GEMMs of other shapes round
differently).  Beyond it the run stops with one line (a bridge whose final norm or
unembedding is not what the lens calls, e.g. a logit soft-cap) and the archive stays partial.

Layers: `lens_layers=all`, `stride:N` (the last block and every N-th before it) or a list of
block indices (negative counting from the end); the last block is always included.
Cost: one [layers * rows, d] x [d, vocab] GEMM per step (layers chunked to bound memory:
`Lens.chunks`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from engine.archive import format as F
from engine.errors import EngineError
from engine.runtime.sampling import Step
from kernels.lens import lens_stats

HOOK = "blocks.{}.hook_resid_post"
#: units in the last place of the model's dtype allowed between the lens at the last block and
#: the logits, relative to the row's largest |logit| (GEMM shape effects: 3.8e-5 measured on
#: SmolLM2 float32 logits ~30, i.e. ~10 ulp)
ULPS = {torch.float32: 64, torch.float64: 64}
HALF_ULPS = 4  # bfloat16 / float16 models: the output is rounded to the dtype once
#: float32 elements of lens logits held at once ([layers, rows, vocab] chunks; the statistics
#: take a few temporaries of that size): 64 MiB, e.g. 32 rows of a 128k vocabulary, 4 layers
CHUNK_ELEMENTS = 16 << 20


@dataclass(frozen=True)
class LensSettings:
    """`lens`, `lens_layers`, `lens_topk` of conf/run/default.yaml."""

    enabled: bool
    layers: str | tuple[int, ...]  # "all", "stride:N" or block indices
    k: int

    @classmethod
    def from_cfg(cls, cfg) -> LensSettings:
        enabled, spec, k = cfg.lens, cfg.lens_layers, cfg.lens_topk
        if not isinstance(enabled, bool):
            raise EngineError(f"lens must be true or false, got {enabled!r}")
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 100):
            raise EngineError(f"lens_topk must be an integer in 1..100, got {k!r}")
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = [spec]
        if isinstance(spec, str):
            if spec != "all" and not re.fullmatch(r"stride:[1-9][0-9]*", spec):
                raise EngineError(
                    f"lens_layers must be all, stride:N or a list of block indices, got {spec!r}"
                )
            layers: str | tuple[int, ...] = spec
        else:
            try:
                items = list(spec)
            except TypeError:
                items = None
            if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise EngineError(
                    f"lens_layers must be all, stride:N or a list of block indices, got {spec!r}"
                )
            layers = tuple(items)
        return cls(enabled, layers, int(k))

    def key(self) -> dict | None:
        """What a run key records (None: no lens, so keys of runs without one are unchanged)."""
        if not self.enabled:
            return None
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        return {"layers": layers, "k": self.k}

    def resolve(self, n_layers: int) -> tuple[int, ...]:
        """Ascending block indices, the last block included."""
        last = n_layers - 1
        if self.layers == "all":
            return tuple(range(n_layers))
        if isinstance(self.layers, str):
            n = int(self.layers.split(":")[1])
            return tuple(sorted(range(last, -1, -n)))
        bad = [i for i in self.layers if not -n_layers <= i < n_layers]
        if bad:
            raise EngineError(
                f"lens_layers {bad} out of range: the model has {n_layers} blocks "
                f"(0..{last}, or -{n_layers}..-1)"
            )
        return tuple(sorted({i % n_layers for i in self.layers} | {last}))


def depth(bridge) -> int:
    """The model's number of blocks."""
    return int(bridge.cfg.n_layers)


def hooks(layers: Iterable[int]) -> list[str]:
    return [HOOK.format(i) for i in layers]


def tolerance_ulps(dtype: torch.dtype) -> float:
    return ULPS.get(dtype, HALF_ULPS) * torch.finfo(dtype).eps


class LensMismatch(EngineError):
    """The last block's lens did not reproduce the model's logits."""


class Lens:
    """One model's lens over chosen blocks: `stats(step)` -> {"lens/<name>": tensor [row,
    layer, ...]} for the writer; `check()` after each batch enforces the invariant."""

    def __init__(self, lm, layers: tuple[int, ...], k: int):
        bridge = lm.bridge
        self.layers, self.k = tuple(layers), int(k)
        self.n_layers = depth(bridge)
        if self.layers[-1] != self.n_layers - 1:
            raise ValueError("the last block must be among the lens layers")  # resolve() adds it
        self.norm = bridge.ln_final.original_component
        self.head = bridge.unembed.original_component
        self.hooks = hooks(self.layers)
        prov = lm.provenance
        self.gamma = float(prov["gamma"]) if prov.get("source") == "tempered" else 1.0
        self.rel = tolerance_ulps(next(self.head.parameters()).dtype)
        self.worst = 0.0  # max |lens at the last block - logits| over the run so far
        self.bound = 0.0  # its bound (the largest over the run's rows)
        self._diff: list[torch.Tensor] = []  # this batch's per-step (diff, bound), on the device

    def chunks(self, n_rows: int, vocab: int, which=None) -> Iterator[list[int]]:
        """Positions (into `layers`, or into `which`) in groups whose [group, rows, vocab]
        float32 lens logits hold at most CHUNK_ELEMENTS (at least one layer): the memory of
        a step's lens, whatever the model's depth and vocabulary."""
        idx = list(range(len(self.layers))) if which is None else list(which)
        per = max(1, CHUNK_ELEMENTS // max(1, n_rows * vocab))
        for a in range(0, len(idx), per):
            yield idx[a : a + per]

    def logits(self, step: Step, which=None) -> torch.Tensor:
        """[layer, row, vocab] float32 lens logits of the layers at positions `which` of
        `layers` (default all) in one GEMM; the last block's row is the step's own logits,
        after its recomputation is recorded for `check`."""
        which = list(range(len(self.layers))) if which is None else list(which)
        acts = [step.acts[self.hooks[i]] for i in which]
        n, V = step.logits.shape
        # t = 0 of a sampled batch: one prompt row expanded over the batch (stride 0): lens it once
        rows = 1 if n > 1 and acts[0].stride(0) == 0 else n
        x = torch.stack([a[:rows] for a in acts]).to(step.logits.device)  # [layer, rows, d]
        L = len(which)
        out = self.head(self.norm(x.reshape(L * rows, -1))).float().view(L, rows, V)
        at_last = [j for j, i in enumerate(which) if i == len(self.layers) - 1]
        if at_last:
            final = step.logits.float()[:rows]
            raw = out[at_last[0]] * self.gamma if self.gamma != 1.0 else out[at_last[0]]
            # a row with non-finite logits (on_nonfinite=record ends it there) has nothing to
            # compare: the check covers the finite rows
            ok = torch.isfinite(final).all(-1, keepdim=True)
            diff = torch.where(ok, (raw - final).abs(), 0).amax()
            bound = self.rel * torch.where(ok, final.abs(), 0).amax().clamp(min=1.0)
            self._diff.append(torch.stack([diff, bound]))
            out[at_last] = final
        return out.expand(L, n, V) if rows < n else out

    @torch.inference_mode()
    def stats(self, step: Step) -> dict[str, torch.Tensor]:
        """{"lens/<name>": [row, layer(, k)]}: `kernels.lens.lens_stats` over the layers, one
        memory-bounded chunk of them at a time (`chunks`)."""
        tokens = torch.as_tensor(step.tokens, device=step.logits.device).clamp(min=0)
        final = step.logits.float()
        parts = [
            lens_stats(final, self.logits(step, which), tokens, self.k)
            for which in self.chunks(*step.logits.shape)
        ]
        return {
            f"{F.LENS}/{name}": torch.cat([p[i] for p in parts], dim=1)
            for i, name in enumerate(parts[0]._fields)
        }

    def check(self) -> None:
        """After a batch: the invariant over its steps (one host sync), else LensMismatch."""
        if not self._diff:
            return
        d = torch.stack(self._diff).cpu().double()
        self._diff.clear()
        i = int(torch.argmax(d[:, 0] - d[:, 1]))
        diff, bound = float(d[i, 0]), float(d[i, 1])
        self.worst, self.bound = max(self.worst, diff), max(self.bound, bound)
        if not diff <= bound:
            raise LensMismatch(
                f"logit lens check failed: the last block's lens differs from the model's "
                f"logits by {diff:.3g} (bound {bound:.3g}); this bridge's final norm or "
                f"unembedding is not what the lens calls (a logit soft-cap?), so lens=true "
                f"cannot be trusted for it"
            )

    def over(self, steps: Iterable[Step]) -> Iterator[Step]:
        """The steps with their lens statistics added (`Step.extras`); the invariant is
        checked once the batch's steps are done."""
        for st in steps:
            st.extras.update(self.stats(st))
            yield st
        self.check()

    def layout(self) -> dict:
        """What the writer creates the group's `lens` datasets from."""
        return {"layers": self.layers, "n_layers": self.n_layers, "k": self.k}


def make(lm, settings: LensSettings) -> Lens | None:
    if not settings.enabled:
        return None
    return Lens(lm, settings.resolve(depth(lm.bridge)), settings.k)
