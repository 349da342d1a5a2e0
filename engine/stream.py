"""Run a kernel over every stored row of an archive in bounded memory.

Reads whole (1, k, vocab) chunks (`Archive.iter_rows`), hands each block to the kernel in its
stored encoding (float16/float32 arrays, or `kernels.Encoded` for bf16/q16, so nothing is
upcast before the kernel), and concatenates the per-row results.  Memory: one chunk and the
kernel's per-row outputs.  Paired kernels (`map_pairs`) read the same step range of two model
groups of one archive, which share samples, steps and positions by construction; the ranges
follow the first model's chunks, and the second model's reads are partial-chunk reads, so
two groups stored with different codecs (different steps per chunk) pair row for row.

Layer: between the archive package and the kernels; its consumers are analyses and benches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from engine.archive import Archive, Block
from engine.errors import EngineError
from kernels import Encoded
from kernels.codecs import CODED


def kernel_input(block: Block, codec: str):
    """A block's rows as the kernels take them (no decoding here)."""
    if codec not in CODED:  # fp16 and fp32 rows are plain float arrays
        return block.raw
    return Encoded(block.raw, codec, block.scale, block.offset)


def _stack(results: list, index: list) -> tuple[dict, np.ndarray, np.ndarray]:
    sample = np.concatenate([np.full(len(st), s) for s, st in index]) if index else np.empty(0, int)
    step = np.concatenate([st for _, st in index]) if index else np.empty(0, int)
    if not results:
        return {}, sample, step
    first = results[0]
    if hasattr(first, "_fields"):  # a kernel record (NamedTuple of arrays)
        out = {f: np.concatenate([getattr(r, f) for r in results]) for f in first._fields}
    elif isinstance(first, dict):  # several per-row arrays by name
        out = {f: np.concatenate([r[f] for r in results]) for f in first}
    else:
        out = {"value": np.concatenate(results)}
    return out, sample, step


def map_rows(
    archive: Archive,
    fn: Callable,
    key: str | None = None,
    samples=None,
    with_tokens: bool = False,
    progress: bool = True,
    desc: str | None = None,
):
    """fn(rows [k, vocab]) -> per-row array or record, over every stored row; with
    `with_tokens`, fn(rows, tokens [k]) gets the sampled token of each row too.

    Returns (results: dict field -> [rows], sample [rows], step [rows])."""
    m = archive.model(key)
    s = archive.samples()
    tokens = s["tokens"] if with_tokens else None
    results, index = [], []
    n_rows = int(s["length"].sum()) if samples is None else None
    with tqdm(
        total=n_rows, unit="row", disable=not progress, desc=desc or m.key, dynamic_ncols=True
    ) as bar:
        for block in archive.iter_rows(key, samples):
            rows = kernel_input(block, m.codec)
            results.append(fn(rows, tokens[block.sample, block.steps]) if with_tokens else fn(rows))
            index.append((block.sample, block.steps))
            bar.update(len(block.steps))
    return _stack(results, index)


def map_pairs(
    archive: Archive, fn: Callable, p_key: str, q_key: str, samples=None, progress: bool = True
):
    """fn(p_rows, q_rows, tokens) -> per-row result, over rows stored for both models."""
    mp, mq = archive.model(p_key), archive.model(q_key)
    if mp.logits.shape != mq.logits.shape:
        raise EngineError(
            f"models {p_key!r} and {q_key!r} have different logit shapes "
            f"{mp.logits.shape} vs {mq.logits.shape}"
        )
    k = mp.chunk_steps  # common step ranges: q may store another number of steps per chunk
    tokens = archive.samples()["tokens"]
    if samples is None:  # rows both models have (a scored group may still be partial)
        samples = range(min(archive.n_complete, mp.n_complete, mq.n_complete))
    results, index = [], []
    with tqdm(disable=not progress, unit="row", desc=f"{p_key} vs {q_key}") as bar:
        for bp, bq in zip(
            archive.iter_rows(p_key, samples, k), archive.iter_rows(q_key, samples, k)
        ):
            tok = tokens[bp.sample, bp.steps]
            results.append(fn(kernel_input(bp, mp.codec), kernel_input(bq, mq.codec), tok))
            index.append((bp.sample, bp.steps))
            bar.update(len(bp.steps))
    return _stack(results, index)
