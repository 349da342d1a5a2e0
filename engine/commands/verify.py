"""`python -m engine verify ARCHIVE [--samples SPEC]`: do the stored bytes still match the
checksums written with them?

Every model group of a version-5 archive holds, per sample, the xxh3_64 of the stored bytes of
steps [0, length) of each per-sample dataset (`logits`, q16 `logits_scale`/`logits_offset`,
`activations/<hook>`; docs/archive-format.md, "Checksums").  verify recomputes them one
sample at a time (memory: one chunk of logits rows, one sample's other rows), reading a merged
archive's rows through its virtual datasets, so the shard files are checked too.  One line per
(sample, group, dataset) that differs, then a summary.  Exit status: 0 all match, 1 any
differs, 2 the input is unusable (missing, not an archive, partial, no checksums).  Reads
through `engine.archive` only: no torch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.archive import Archive, ModelView
from engine.archive import format as F
from engine.archive.checksums import digest, stream
from engine.cli import parse_samples, user_errors
from engine.errors import EngineError

#: what h5py and the mapped reader raise on a damaged chunk index or metadata
UNREADABLE = (OSError, RuntimeError, ValueError)


@dataclass
class Mismatch:
    """One stored checksum that the bytes no longer give."""

    sample: int
    group: str
    dataset: str  # relative to the group
    stored: int
    computed: int
    kind: str = "model"  # or "layer pairs" (/layer_pairs/<base>~<aligned>)

    def line(self) -> str:
        if self.dataset.startswith("(unreadable"):
            return f"UNREADABLE sample {self.sample} {self.kind} {self.group} {self.dataset}"
        return (
            f"MISMATCH sample {self.sample} {self.kind} {self.group} {self.dataset}: stored "
            f"{self.stored:016x}, computed {self.computed:016x}"
        )


@dataclass
class Report:
    """What one verification compared and found."""

    path: str
    samples: int = 0  # samples checked (in at least one group)
    checks: int = 0  # checksums compared
    bytes: int = 0  # stored bytes hashed
    seconds: float = 0.0
    mismatches: list[Mismatch] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # groups without checksums
    partial: dict = field(default_factory=dict)  # group -> committed samples (fewer than all)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        head = (
            f"{self.checks} checksums of {self.samples} samples, "
            f"{tqdm.format_sizeof(self.bytes, 'B')} in {self.seconds:.2f} s ({rate:.2f} GB/s)"
        )
        if self.ok:
            line = f"ok: {head}: all match"
        else:
            bad = sorted({m.sample for m in self.mismatches})
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            line = (
                f"DAMAGED: {len(self.mismatches)} of {head} differ, in {len(bad)} "
                f"sample{'s' if len(bad) > 1 else ''} ({shown})"
            )
        if self.unverified:
            line += f"; not verified (no checksums): {', '.join(self.unverified)}"
        for key, n in self.partial.items():
            line += f"; {key}: only its {n} committed samples"
        return line


def verify(
    path: str | Path,
    samples: str | None = None,
    progress: bool = True,
    report: Callable[[str], object] = print,
) -> Report:
    """Recompute the checksums of `path` (all complete samples, or the `samples` spec, e.g.
    `0,3,10-20`), calling `report` with each mismatch's line as it is found."""
    t = time.perf_counter()
    with Archive(path) as a:
        groups = {k: m for k, m in a.models.items() if m.checksum_columns is not None}
        if not groups:
            raise EngineError(
                f"no checksums (format version {a.format_version}): {path} was "
                f"written before archives carried them; nothing to verify"
            )
        chosen = parse_samples(samples, a.n_complete) if samples else list(range(a.n_complete))
        out = Report(path=str(path), unverified=[k for k in a.models if k not in groups])
        lengths = a.samples()["length"]
        plan = {k: [i for i in chosen if i < m.n_complete] for k, m in groups.items()}
        out.partial = {k: m.n_complete for k, m in groups.items() if m.n_complete < a.n_complete}
        out.samples = len({i for mine in plan.values() for i in mine})
        total = sum(_bytes(m, lengths[plan[k]]) for k, m in groups.items()) + sum(
            int(np.sum(lengths[: lp.n_complete])) * 4 * len(lp.layers_base) * 5
            for lp in a.layer_pairs.values()
        )
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="verify",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            for key, m in groups.items():
                for bad in _check_group(a, m, plan[key], _counting(out, bar)):
                    out.mismatches.append(bad)
                    report(bad.line())
                out.checks += len(plan[key]) * len(m.checksum_columns)
            for name, lp in a.layer_pairs.items():
                mine = [i for i in chosen if i < lp.n_complete]
                if lp.n_complete < a.n_complete:
                    out.partial[name] = lp.n_complete
                for bad in _check_layer_pairs(lp, mine, lengths, _counting(out, bar)):
                    out.mismatches.append(bad)
                    report(bad.line())
                out.checks += len(mine) * len(F.LAYER_PAIR_STATS)
    out.seconds = time.perf_counter() - t
    return out


def _check_layer_pairs(lp, samples, lengths, progress) -> Iterator[Mismatch]:
    """Mismatches of one /layer_pairs group (format version 6) over `samples`."""
    if not samples:
        return
    stored = lp.group[F.CHECKSUMS][: samples[-1] + 1]
    for i in samples:
        for c, name in enumerate(F.LAYER_PAIR_STATS):
            rows = lp[name][i, : int(lengths[i])]
            progress(rows.nbytes)
            got = digest(np.ascontiguousarray(rows))
            if got != int(stored[i, c]):
                yield Mismatch(i, lp.name, name, int(stored[i, c]), got, "layer pairs")


def _counting(out: Report, bar: tqdm) -> Callable[[int], None]:
    def count(nbytes: int) -> None:
        out.bytes += nbytes
        bar.update(nbytes)

    return count


def _bytes(m: ModelView, lengths: np.ndarray) -> int:
    """Stored bytes of steps [0, length) of every checksummed dataset, over these samples."""
    steps = int(np.sum(lengths))
    return sum(
        steps * _dataset(m, name).dtype.itemsize * int(np.prod(_dataset(m, name).shape[2:]))
        for name in m.checksum_columns
    )


def _dataset(m: ModelView, name: str):
    if name not in m.group:
        raise EngineError(
            f"model {m.key!r} has checksums of {name!r} but no such dataset "
            f"(damaged or foreign archive)"
        )
    return m.group[name]


def _check_group(
    a: Archive, m: ModelView, samples: list[int], progress: Callable[[int], None]
) -> Iterator[Mismatch]:
    """Mismatches of one group over `samples` (sorted), one sample at a time."""
    if not samples:
        return
    stored = m.checksums(samples[-1] + 1)  # [sample, column]

    def compare(i, digests):
        for c, (name, got) in enumerate(zip(m.checksum_columns, digests)):
            if got != int(stored[i, c]):
                yield Mismatch(i, m.key, name, int(stored[i, c]), got)

    rest = list(samples)
    while rest:
        try:
            for i, digests in _digests(a, m, list(rest), progress):
                rest.remove(i)
                yield from compare(i, digests)
        except UNREADABLE:  # a damaged chunk index or metadata, met in this sample or while
            i = rest.pop(0)  # reading ahead into the next: read this one alone to tell
            try:
                for _, digests in _digests(a, m, [i], progress):
                    yield from compare(i, digests)
            except UNREADABLE as exc:
                yield Mismatch(i, m.key, f"(unreadable: {str(exc).splitlines()[0][:120]})", 0, 0)


def _digests(
    a: Archive, m: ModelView, samples: list[int], progress: Callable[[int], None]
) -> Iterator[tuple[int, list[int]]]:
    """(sample, its digest of every column) in sample order: the logits streamed chunk by
    chunk through the reader (`iter_rows`: views of the file's pages where it can), every
    other column read whole for that sample ([length, ...], small)."""
    lengths = a.samples()["length"]
    with contextlib.closing(a.iter_rows(m.key, samples=samples)) as blocks:
        pending = next(blocks, None)
        for i in samples:
            h = stream()
            while pending is not None and pending.sample == i:
                raw = np.ascontiguousarray(pending.raw)  # [steps, vocab] as stored
                h.update(raw)
                progress(raw.nbytes)
                pending = next(blocks, None)
            out = []
            for name in m.checksum_columns:
                if name == "logits":
                    out.append(h.intdigest())
                    continue
                rows = _dataset(m, name)[i, : int(lengths[i])]  # [step, ...] as stored
                out.append(digest(np.ascontiguousarray(rows)))
                progress(rows.nbytes)
            yield i, out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m engine verify", description=__doc__.split("\n")[0])
    ap.add_argument("archive")
    ap.add_argument(
        "--samples", help="samples to check, e.g. 0,3,10-20 (ranges inclusive; default: all)"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with user_errors():
        r = verify(
            args.archive,
            args.samples,
            not args.no_progress,
            report=lambda line: tqdm.write(line, file=sys.stdout),
        )
    print(r.summary())
    return 0 if r.ok else 1
