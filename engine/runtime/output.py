"""Where an archive-writing run puts its result, and the one lifecycle every such verb runs
through (dump, perturb, answers: a new file; score: a group added to an existing file).

Output rules: a new archive is written to `<out>.partial` and renamed onto `out` when
complete (`engine.files.atomic_replace`); an existing `out` is replaced only with
overwrite=true (and only once the new one is complete); a leftover partial is continued with
resume=true.  A scored group is written in place and marked complete last.  While a run
writes, an interrupt prints the command that continues it; an error keeps what was committed.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine import archive
from engine.errors import EngineError, on_interrupt
from engine.files import atomic_replace
from engine.runtime.settings import Output


@dataclass
class Plan:
    out: Path  # the final archive
    partial: Path  # where it is written until complete
    resuming: bool  # continue `partial`


def plan_output(o: Output, key: dict | None = None) -> Plan:
    """Decide what to do with existing files from out, resume and overwrite.

    resume=PATH continues that `.partial` (or the partial of that archive).  resume=true
    continues `<out>.partial`; when `out` is the default (inside this run's fresh Hydra
    directory) and holds none, the newest partial with the same run key in an earlier run's
    directory (outputs/<verb>/<time>/) is continued: an interrupted run resumes without
    copying its path."""
    if isinstance(o.resume, str):
        out = Path(o.resume.removesuffix(".partial")).expanduser().resolve()
        if not out.with_name(out.name + ".partial").exists():
            raise EngineError(f"resume={o.resume}: no {out.name}.partial there to continue")
        return Plan(out, out.with_name(out.name + ".partial"), True)
    out = o.out
    partial = out.with_name(out.name + ".partial")
    if out.is_dir():
        raise EngineError(f"out={out} is a directory; give a file path")
    if out.exists() and not o.overwrite:
        raise EngineError(f"{out} exists; pass overwrite=true to replace it")
    if o.resume and not partial.exists() and key is not None and out.parent == o.run_dir:
        found = find_partial(out, key)
        if found is None:
            raise EngineError(
                "resume=true: no interrupted run with these settings beside "
                "this one (resume=PATH continues a given .partial)"
            )
        return Plan(found.with_name(found.name.removesuffix(".partial")), found, True)
    resuming = False
    if partial.exists():
        if o.resume:
            resuming = True
        elif not o.overwrite:
            raise EngineError(
                f"{partial} is left from an interrupted run: pass resume=true to "
                f"continue it or overwrite=true to start over"
            )
    return Plan(out, partial, resuming)


def _earlier_runs(out: Path) -> list[Path]:
    """Where earlier runs of this verb left `<out.name>.partial`: every run directory beside
    this run's (outputs/<verb>/*/) and every job directory of every multirun beside this
    multirun's (outputs/<verb>-multirun/*/*/), wherever hydra.run.dir / hydra.sweep.dir
    point; without Hydra, the siblings of out's directory."""
    name = f"{out.name}.partial"
    roots = [(out.parent.parent, f"*/{name}")]
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        roots = [
            (Path(str(hc.run.dir)).resolve().parent, f"*/{name}"),
            (Path(str(hc.sweep.dir)).resolve().parent, f"*/*/{name}"),
        ]
    except ValueError:  # not under @hydra.main (tests calling run())
        pass
    return sorted({p.resolve() for root, pat in roots for p in root.glob(pat)})


def find_partial(out: Path, key: dict) -> Path | None:
    """Newest partial left by an earlier run (see `_earlier_runs`) whose run key is `key` (a
    shard's key holds its index, so each shard finds its own)."""
    want = json.loads(json.dumps(key))
    found = sorted(_earlier_runs(out), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        try:
            with archive.Archive(path, allow_partial=True) as a:
                if a.run_key == want:
                    return path
        except EngineError:
            continue
    return None


def task_overrides() -> list[str]:
    """This run's command-line overrides (Hydra's record, or sys.argv without Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (tests calling run())
        return sys.argv[1:]


def overridden(group: str) -> bool:
    """Whether the command line chose `group=...` (rather than the config's default)."""
    return any(a.lstrip("+~").split("=", 1)[0] == group for a in task_overrides())


def continue_command(verb: str, *extra: str) -> str:
    """The command that continues this run: its own overrides, `extra` instead of out/resume/
    overwrite."""
    args = [a for a in task_overrides() if not a.startswith(("out=", "resume=", "overwrite="))]
    return " ".join(["python -m engine", verb, *map(shlex.quote, [*args, *extra])])


# ---- the lifecycle -----------------------------------------------------------------------------
@contextlib.contextmanager
def writing(where: str, advice: str, writer, complete: Callable[[], None] = lambda: None):
    """The one lifecycle of an archive-writing run, around an open `writer`: while the block
    runs, an interrupt prints that `where` keeps the finished batches and `advice` (the
    command that continues it); the writer is closed however the block ends; when the block
    completes, `complete()` makes the result final (a new file's rename) and the advice is
    withdrawn.  When it raises, what was committed stays for resume=true."""
    on_interrupt(f"{where} keeps the finished batches; continue with: {advice}")
    with writer:
        yield writer
    complete()
    on_interrupt(None)


def new_archive(
    plan: Plan,
    verb: str,
    create: Callable[[Path], archive.ArchiveWriter],
    key: dict,
    init: Callable[[archive.ArchiveWriter], None] | None = None,
):
    """`writing` for a new archive file: reopen the partial of an interrupted run (refused when
    its self-check failed) or create a fresh one with `create(partial)`, then `init(writer)`
    writes what a fresh archive holds before its first batch (lineage, answers); a fresh
    partial whose `init` fails is removed, so no resume continues it without them.  Renamed
    onto `plan.out` when complete."""
    plan.partial.parent.mkdir(parents=True, exist_ok=True)
    if plan.resuming:
        w = archive.open_for_resume(plan.partial, key)
        if w.rows.self_check_failed():
            w.close()
            raise EngineError(
                f"cannot resume {plan.partial}: its self-check failed (its rows "
                f"are not the model's distributions; inspect shows the check); "
                f"use overwrite=true to start over"
            )
    else:
        plan.partial.unlink(missing_ok=True)
        w = create(plan.partial)
        try:
            if init is not None:
                init(w)
        except BaseException:
            w.close()
            plan.partial.unlink(missing_ok=True)
            raise
    return writing(
        str(plan.partial),
        continue_command(verb, f"resume={plan.partial}"),
        w,
        lambda: atomic_replace(plan.partial, plan.out),
    )
