"""`python -m analyses analysis=NAME archive=PATH`: thin Hydra wrapper around `run(cfg)`."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from analyses.common import register_resolvers, write_json
from engine.cli import check_group_choices, check_launcher, user_errors
from engine.config import CONF, options
from engine.errors import EngineError
from engine.extras import require
from engine.archive import Archive


register_resolvers()

#: analyses that need an optional part of the install (the others need the core alone)
EXTRAS = {"diversity": "text", "personas": "text"}


def run(cfg: DictConfig) -> dict:
    """Run one analysis over one archive; returns its summary (also written as summary.json)."""
    name = str(cfg.analysis.name)
    if name not in options("analysis"):
        raise EngineError(f"unknown analysis {name!r}; available: {', '.join(options('analysis'))}")
    if name in EXTRAS:
        require(EXTRAS[name], f"analysis={name}")
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(f"analyses.{name}")
    if not getattr(module, "NEEDS_ARCHIVE", True):  # e.g. report: reads other runs' summaries
        summary = module.run(cfg, None, out)
    else:
        with Archive(cfg.archive) as a:
            summary = module.run(cfg, a, out)
            summary.update(archive=str(a.path), generator=a.generator)
    summary.update(analysis=name, config=OmegaConf.to_container(cfg.analysis, resolve=True))
    summary["summary"] = str(write_json(out, "summary.json", summary))
    return summary


def files_written(out: Path, since: float) -> list[str]:
    """The files this run wrote into its directory (Hydra's own log aside), sorted."""
    return sorted(p.name for p in out.iterdir()
                  if p.is_file() and p.suffix != ".log" and p.stat().st_mtime >= since)


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="analyses")
def main(cfg: DictConfig) -> None:
    start = time.time() - 1  # file times can round down
    with user_errors():
        result = run(cfg)
    out = Path(result["summary"]).parent
    print(f"{result['analysis']}: {out}" + (f"  ({result['archive']})" if result.get("archive") else ""))
    lines = getattr(importlib.import_module(f"analyses.{result['analysis']}"), "terminal_lines", None)
    for line in (lines(result) if lines else []):  # the run's headline numbers
        print(f"  {line}")
    if result.get("report"):
        print(f"  report {result['report']}")
    print("  files: " + ", ".join(files_written(out, start)))


if __name__ == "__main__":
    import sys

    check_group_choices(sys.argv[1:], ("analysis",))
    check_launcher(sys.argv[1:])
    main()
