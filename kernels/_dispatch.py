"""One dispatch for every public kernel: numpy input to numba, torch input to torch.

`rows(x)` normalises one logits argument [..., vocab] (numpy float16/32/64, torch tensor, or
`Encoded` stored rows of either) to `NumbaRows` or `TorchRows`; `pair(p, q)` two of them of
the same shape, routed by p.  Both kinds have one interface, so each public function of
`kernels.api` is written once, without a backend branch:

  .map(name, *args, out=spec)  kernel `name` over all rows; each output [rows, *trail] comes
                               back as [..., *trail] (the input's leading dimensions kept)
  .tokens(t), .per_row(a)      per-row arguments, normalised and checked for that backend
  .lead, .n, .vocab            leading shape, number of rows, vocabulary size
  .exp(a), .like(a, out)       the few element-wise operations done on kernel outputs

Kernel `name` is `_numba.family(kind)[name]` (one input) or `_numba.pair_family(kp, kq)[name]`
(p and q), which write into outputs allocated here from `spec` ((dtype, trailing shape), or a
tuple of them), and `_torch.<name>` applied to blocks of rows: the torch block loop is
`TorchRows.map`, the only one.  This is numbagg's pattern (its `decorators.py`): one wrapper
owns shapes, dtypes and output allocation, the kernels only ever see [rows, vocab].

torch is imported only when a torch tensor is passed (then it is already in sys.modules):
reading archives and running the numba kernels never pays for importing torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from kernels import _numba
from kernels.codecs import KERNEL_KIND

F64 = (np.float64, ())  # the commonest output: one float64 per row
NUMPY_KIND = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


@dataclass(frozen=True)
class Encoded:
    """Stored logit rows as an archive keeps them: `data` [..., vocab] uint16 (bf16 bits or
    q16 codes; numpy uint16 or torch int16/uint16), with q16's per-row `scale`, `offset` [...]."""

    data: object
    codec: str
    scale: object = None
    offset: object = None

    def __post_init__(self):
        if self.codec not in KERNEL_KIND:
            raise ValueError(f"Encoded codec must be bf16, q16 or fp16, got {self.codec!r}")
        if self.codec == "q16" and (self.scale is None or self.offset is None):
            raise ValueError("q16 rows need their per-row scale and offset")


def is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x.data if isinstance(x, Encoded) else x, torch.Tensor)


def _data(x):
    return x.data if isinstance(x, Encoded) else x


def _specs(out):
    """`out` as a tuple of (dtype, trailing shape), and whether it was a single one."""
    single = isinstance(out[0], type)
    return ((out,) if single else tuple(out)), single


class PerRow:
    """An argument with one entry (or row) per logits row: whole for numba, sliced per block
    for torch."""

    def __init__(self, value):
        self.value = value


def rows(x):
    """NumbaRows or TorchRows of one logits argument."""
    return TorchRows(x) if is_torch(x) else NumbaRows(x)


def pair(p, q, numba_only=False):
    """NumbaPair or TorchPair of p and q logits of the same shape (the backend of p;
    `numba_only`: numba whatever the type, for callers that iterate in numpy)."""
    sp, sq = np.shape(_data(p)), np.shape(_data(q))
    if tuple(sp) != tuple(sq):
        raise ValueError(f"p and q must have the same shape, got {tuple(sp)} and {tuple(sq)}")
    if is_torch(p) and not numba_only:
        return TorchPair(TorchRows(p), TorchRows(q))
    return NumbaPair(NumbaRows(p), NumbaRows(q))


def tokens(t, n, vocab, device=None):
    """The one token-id rule of both backends: integers, one per row, each in [0, vocab).
    numpy int64 for numba, or (with `device`) a long tensor there; checked before any kernel
    indexes with them (an out-of-range gather is a device-side assert on CUDA)."""
    if is_torch(t):
        import torch

        t = t.reshape(-1)
        ints = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        lo_hi = torch.aminmax(t.long()) if ints and t.numel() else None
        lo, hi = (int(v) for v in torch.stack(lo_hi).tolist()) if lo_hi else (0, 0)
    else:
        t = np.asarray(t).reshape(-1)
        ints = np.issubdtype(t.dtype, np.integer)
        lo, hi = (int(t.min()), int(t.max())) if ints and t.size else (0, 0)
    if not ints:
        raise ValueError(f"token ids must be integers, got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"need one token per row: {n} rows, {t.shape[0]} tokens")
    if t.shape[0] and (lo < 0 or hi >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got [{lo}, {hi}]")
    if device is None:
        return np.asarray(t.cpu() if is_torch(t) else t).astype(np.int64)
    import torch

    return torch.as_tensor(t).long().to(device)


# ---- numba ---------------------------------------------------------------------------------
class NumbaRows:
    """[rows, vocab] view of numpy logits (or numpy `Encoded` data) without copying: `kind`
    names the numba decoder, float16 is read through a uint16 view."""

    def __init__(self, x):
        if isinstance(x, Encoded):
            kind = KERNEL_KIND[x.codec]
            data = np.asarray(x.data)
            if data.dtype == np.float16:
                data = data.view(np.uint16)
            if data.dtype != np.uint16:
                raise ValueError(f"{x.codec} data must be uint16, got {data.dtype}")
        else:
            data = np.asarray(x)
            if data.dtype not in NUMPY_KIND:
                raise ValueError(
                    f"logits must be float16/32/64 (or kernels.Encoded for "
                    f"bf16/q16 uint16 data), got {data.dtype}"
                )
            kind = NUMPY_KIND[data.dtype]
            if kind == "f16":
                data = data.view(np.uint16)
        if data.ndim < 1 or data.shape[-1] < 1:
            raise ValueError(f"logits need a non-empty last (vocab) axis, got shape {data.shape}")
        self.kind, self.lead = kind, data.shape[:-1]
        self.data = data.reshape(-1, data.shape[-1])
        self.n, self.vocab = self.data.shape
        if isinstance(x, Encoded) and x.codec == "q16":
            self.scale = np.asarray(x.scale, np.float32).reshape(self.n)
            self.offset = np.asarray(x.offset, np.float32).reshape(self.n)
        else:
            self.scale = self.offset = np.zeros(self.n, np.float32)

    @property
    def args(self):
        return self.data, self.scale, self.offset

    def flat(self):
        """A kernel input for the same rows as [rows, vocab] (no copy)."""
        if self.kind == "f16":
            return self.data.view(np.float16)
        if self.kind in ("bf16", "q16"):
            return Encoded(self.data, self.kind, self.scale, self.offset)
        return self.data

    def tokens(self, t):
        return PerRow(tokens(t, self.n, self.vocab))

    def optional_tokens(self, t):
        """Token ids, or -1 in every row (the kernels' "no token")."""
        return PerRow(np.full(self.n, -1, np.int64)) if t is None else self.tokens(t)

    def per_row(self, a):
        """`a` [G] (the same for every row) or [..., G] as float64 [rows, G]."""
        a = np.asarray(a, np.float64)
        a = np.broadcast_to(a, (self.n, a.shape[-1])) if a.ndim == 1 else a.reshape(self.n, -1)
        return PerRow(np.ascontiguousarray(a))

    def kernel(self, name):
        return _numba.family(self.kind)[name]

    def map(self, name, *args, out):
        return _numba_map(self, self.kernel(name), self.args, args, out)

    @staticmethod
    def exp(a):
        return np.exp(a)

    @staticmethod
    def like(a, out):
        return np.asarray(a, np.float64)


def _numba_map(r, kernel, inputs, args, out):
    specs, single = _specs(out)
    outs = [np.empty((r.n, *trail), dtype) for dtype, trail in specs]
    kernel(*inputs, *(a.value if isinstance(a, PerRow) else a for a in args), *outs)
    outs = [o.reshape(*r.lead, *trail) for o, (_, trail) in zip(outs, specs)]
    return outs[0] if single else tuple(outs)


class NumbaPair:
    """p and q rows for the two-input numba kernels (each in its own codec)."""

    def __init__(self, p: NumbaRows, q: NumbaRows):
        self.p, self.q = p, q
        self.lead, self.n, self.vocab = p.lead, p.n, p.vocab
        self.tokens, self.optional_tokens = p.tokens, p.optional_tokens

    def map(self, name, *args, out):
        kernel = _numba.pair_family(self.p.kind, self.q.kind)[name]
        return _numba_map(self, kernel, self.p.args + self.q.args, args, out)

    def fit_gamma(self, g_max, tol, max_iter, base=None, *, out):
        """The base pass (`gamma_base`, unless the caller has `base` [rows, 7]), then the fit,
        one pass over p per iteration."""
        from kernels.columns import N_COLUMNS

        if base is None:
            base = self.map("gamma_base", out=(np.float64, (N_COLUMNS,)))
        base = np.ascontiguousarray(base, np.float64).reshape(self.n, N_COLUMNS)
        return _numba_map(
            self,
            _numba.fit_gamma_kernel(self.p.kind),
            self.p.args,
            (base, g_max, tol, max_iter),
            out,
        )


# ---- torch ---------------------------------------------------------------------------------
class TorchRows:
    """[rows, vocab] torch logits (or torch `Encoded` data), decoded block by block."""

    def __init__(self, x):
        from kernels import _torch

        self._torch = _torch
        if isinstance(x, Encoded):
            data, self.codec = x.data, x.codec
            self.scale = x.scale.reshape(-1) if x.scale is not None else None
            self.offset = x.offset.reshape(-1) if x.offset is not None else None
        else:
            data, self.codec, self.scale, self.offset = x, "fp32", None, None
        self.lead = tuple(data.shape[:-1])
        self.data = data.reshape(-1, data.shape[-1])
        self.n, self.vocab = self.data.shape
        self.device = data.device

    def blocks(self):
        """(slice, decoded block [b, vocab]) covering the rows, `BLOCK_BYTES` at a time."""
        for sl in self._torch.blocks(self.n, self.vocab):
            yield (
                sl,
                self._torch.decode(
                    self.data[sl],
                    self.codec,
                    None if self.scale is None else self.scale[sl],
                    None if self.offset is None else self.offset[sl],
                ),
            )

    def tokens(self, t):
        return PerRow(tokens(t, self.n, self.vocab, self.device))

    def optional_tokens(self, t):
        return None if t is None else self.tokens(t)

    def per_row(self, a):
        import torch

        a = torch.as_tensor(a)
        return PerRow(a.reshape(1, -1).expand(self.n, -1) if a.ndim == 1 else a.reshape(self.n, -1))

    def map(self, name, *args, out):
        return _torch_map(
            self, getattr(self._torch, name), [r.blocks() for r in (self,)], args, out
        )

    @staticmethod
    def exp(a):
        return a.exp()

    @staticmethod
    def like(a, out):
        import torch

        return torch.as_tensor(a, dtype=out.dtype, device=out.device)


_TORCH_DTYPE = {np.float64: "float64", np.float32: "float32", np.int64: "int64"}


def _torch_map(r, fn, block_iters, args, out):
    """fn(block(s), per-row args sliced to the block, other args) per block of rows; the
    blocks' outputs concatenated and given the input's leading dimensions."""
    import torch

    specs, single = _specs(out)
    parts = [[] for _ in specs]
    for blocks in zip(*block_iters):
        sl = blocks[0][0]
        res = fn(
            *(b for _, b in blocks),
            *(a.value[sl].to(blocks[0][1].device) if isinstance(a, PerRow) else a for a in args),
        )
        for acc, o in zip(parts, (res,) if single else res):
            acc.append(o)
    outs = [
        torch.cat(acc)
        if acc
        else torch.empty((0, *trail), dtype=getattr(torch, _TORCH_DTYPE[dtype]))
        for acc, (dtype, trail) in zip(parts, specs)
    ]
    outs = [o.reshape(*r.lead, *o.shape[1:]) for o in outs]
    return outs[0] if single else tuple(outs)


class TorchPair:
    """p and q torch rows, decoded block by block in step."""

    def __init__(self, p: TorchRows, q: TorchRows):
        self.p, self.q = p, q
        self.lead, self.n, self.vocab = p.lead, p.n, p.vocab
        self.tokens, self.optional_tokens = p.tokens, p.optional_tokens

    def map(self, name, *args, out):
        return _torch_map(
            self, getattr(self.p._torch, name), [self.p.blocks(), self.q.blocks()], args, out
        )

    def fit_gamma(self, g_max, tol, max_iter, base=None, *, out):
        """`base` is a numba-path shortcut; torch computes its own per block."""
        return self.map("fit_gamma", g_max, tol, max_iter, out=out)
