"""The batch schedule: which samples each batch decodes, a shard's share of them, and the loop
that fills an archive batch by batch with a progress bar.

Batches lie on one grid, so a shard or a resumed run decodes exactly the batches of one
uninterrupted run, and the draws (seeded per sample) are the same.  Two grids:

- within prompts (teacher-forced verbs, and sampling with batch_across_prompts=false): each
  prompt's first sample + k * batch_size; every row of a batch reads the same prompt;
- across prompts (sampling's default): k * batch_size over all samples, so a run of many
  prompts with few samples each (16 prompts x 4) still decodes full batches: on 2 CPU cores a
  decode step costs 13 ms per row in batches of 8 and 4 ms in batches of 32.  Where
  per_prompt is a multiple of batch_size the two grids are the same batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from engine import archive
from engine.errors import EngineError
from engine.runtime.settings import Sharding


def batches(
    n_prompts: int,
    per_prompt: int,
    batch_size: int,
    start: int,
    stop: int | None = None,
    across: bool = False,
):
    """(prompt of the first row, first sample, end sample) of every batch covering samples
    start..stop-1 (global indices), on one grid whatever start is: a shard or a resumed run
    decodes exactly the batches of one uninterrupted run.  across=False: batches never
    straddle prompts (grid: each prompt's first sample + k * batch_size); across=True: the
    grid is k * batch_size and a batch's rows may read several prompts (row i reads prompt
    i // per_prompt)."""
    total = n_prompts * per_prompt
    stop = total if stop is None else stop
    # the grid's ranges: all samples at once, or each prompt's own
    ranges = (
        [(0, total)]
        if across
        else [(p * per_prompt, (p + 1) * per_prompt) for p in range(n_prompts)]
    )
    for lo, hi in ranges:
        for s0 in range(lo, hi, batch_size):
            s1 = min(s0 + batch_size, hi)
            if s1 > start and s0 < stop:
                a = max(s0, start)
                yield a // per_prompt, a, min(s1, stop)


def straddles(n_prompts: int, per_prompt: int, batch_size: int, across: bool) -> bool:
    """Whether some batch of the run reads more than one prompt (the run key says so then:
    such a batch is left-padded, so its rows' logits differ in their last bits from a
    one-prompt batch's)."""
    return across and n_prompts > 1 and per_prompt % batch_size != 0


def plan_shard(
    sharding: Sharding, n_prompts: int, per_prompt: int, batch_size: int, across: bool = False
) -> archive.Shard | None:
    """This process's share of a sharded dump (shard=i num_shards=n): a contiguous run of whole
    batches, batch b of B going to shard b * n // B, so the shards differ by at most one batch.
    None when the dump is not sharded (num_shards=1)."""
    index, count = sharding.index, sharding.count
    if count == 1:
        return None
    n_batches = len(list(batches(n_prompts, per_prompt, batch_size, 0, across=across)))
    if count > n_batches:
        raise EngineError(
            f"num_shards={count} is more than the run's {n_batches} batches "
            f"({n_prompts} prompts x {per_prompt} samples, batch_size="
            f"{batch_size}); use num_shards <= {n_batches}"
        )
    return shard_of(n_prompts, per_prompt, batch_size, index, count, across)


def shard_of(
    n_prompts: int, per_prompt: int, batch_size: int, index: int, count: int, across: bool = False
) -> archive.Shard:
    """Shard `index` of `count`: batches b * count // B == index of the run's B batches."""
    grid = list(batches(n_prompts, per_prompt, batch_size, 0, across=across))
    lo, hi = index * len(grid) // count, (index + 1) * len(grid) // count
    return archive.Shard(index, count, grid[lo][1], grid[hi - 1][2], n_prompts * per_prompt)


def out_of_memory(rows: int, device) -> str:
    """One line for a batch that does not fit, naming a batch size that would."""
    free = ""
    if torch.cuda.is_available():
        f, total = torch.cuda.mem_get_info()
        free = f" ({f / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    return (
        f"a batch of {rows} rows does not fit in GPU memory{free} on device={device}; "
        f"use batch_size={max(1, rows // 2)} (with overwrite=true: the batch size is part "
        f"of the run key)"
    )


def fill(
    n_prompts: int,
    per_prompt: int,
    batch_size: int,
    done: int,
    desc: str,
    write: Callable[[int, int, int], None],
    span: tuple[int, int] | None = None,
    progress: bool = True,
    device: str = "auto",
    across: bool = False,
) -> None:
    """Call write(prompt, s0, s1) (global sample indices; prompt: the first row's) for every
    batch of the archive's samples `span` (default: all) after its first `done`, on the grid
    `batches(..., across)`; each call writes and commits one batch.  A progress bar counts
    samples."""
    lo, hi = span or (0, n_prompts * per_prompt)
    with tqdm(
        total=hi - lo,
        initial=done,
        unit="sample",
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for p, s0, s1 in batches(n_prompts, per_prompt, batch_size, lo + done, hi, across):
            try:
                write(p, s0, s1)
            except torch.cuda.OutOfMemoryError:
                raise EngineError(out_of_memory(s1 - s0, device)) from None
            bar.update(s1 - s0)
