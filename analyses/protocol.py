"""What an analysis is: the contract each one declares, the registry of all of them, and where
their Hydra configs live.

An analysis is a module `analyses/<name>.py` with a config `analyses/conf/analysis/<name>.yaml`
(`name: <name>` and its options), listed in `NAMES` below, that declares itself at module level:

    ANALYSIS = Analysis(name="<name>", run=run, terminal_lines=terminal_lines)

`python -m analyses` (analyses/__main__.py) reads that object and nothing else of the module.
Code shared by analyses lives in `analyses.lib`, never beside them; tests/test_layers.py checks
that the modules, `NAMES` and the configs name the same analyses.  docs/analyses.md: how to add
one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineError
from engine.extras import require

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from engine.archive import Archive

#: every analysis, by name: the module analyses/<name>.py and the config conf/analysis/<name>.yaml
NAMES = (
    "answers",
    "attractor",
    "diversity",
    "entropy",
    "layers",
    "mitigation",
    "pair",
    "personas",
    "report",
)
#: the install extra an analysis needs beyond the core (engine/extras.py), checked before its
#: module is imported (its imports are what would be missing)
EXTRAS = {"diversity": "text", "personas": "text"}

#: the analyses' Hydra configs (analyses.yaml, analysis/), shipped inside the package; the groups
#: they share with the engine's verbs (paths/, hydra/launcher/) stay in engine/conf, found
#: through analyses.yaml's `hydra.searchpath`
CONF = Path(__file__).resolve().parent / "conf"


def no_lines(summary: dict) -> list[str]:
    """The default `terminal_lines`: nothing printed beyond the run directory and its files."""
    return []


@dataclass(frozen=True)
class Analysis:
    """One analysis, as `python -m analyses` runs it.

    name: the module's name, the config's `name` and the `analysis=` choice.
    run(cfg, archive, out) -> summary: `cfg` is the composed config (the analysis's options
        under `cfg.analysis`, plus `progress`, `paths`); `archive` the open `Archive` of
        `cfg.archive`, or None when `needs_archive` is false; `out` the run directory, which
        exists and is the only place to write.  The summary is a JSON-able dict; the runner
        adds `analysis`, `config`, `summary` (the path of summary.json) and, with an archive,
        `archive` and `generator`, then writes it as summary.json.
    needs_archive: false for an analysis of other runs' outputs (report).
    terminal_lines(summary) -> lines: the headline numbers printed after a run (default none).
    """

    name: str
    run: Callable[[DictConfig, Archive | None, Path], dict]
    needs_archive: bool = True
    terminal_lines: Callable[[dict], list[str]] = no_lines


def get(name: str) -> Analysis:
    """The analysis declared by analyses/<name>.py (imported now, so a run imports only the
    analysis it runs)."""
    if name not in NAMES:
        raise EngineError(f"unknown analysis {name!r}; available: {', '.join(NAMES)}")
    require(EXTRAS.get(name), f"analysis={name}")
    return importlib.import_module(f"{__package__}.{name}").ANALYSIS


def options(group: str) -> list[str]:
    """The options of a config group of analyses/conf (as `engine.config.options` for engine/conf)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))
