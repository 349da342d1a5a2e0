"""`python -m analyses analysis=NAME archive=PATH`: thin Hydra wrapper that runs the analysis
NAME declares (`analyses.protocol`: its `ANALYSIS`) and writes its summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from analyses.lib.common import register_resolvers, write_json
from analyses.protocol import CONF, get, options
from engine.archive import Archive
from engine.cli import check_group_choices, check_launcher, user_errors

register_resolvers()


def run(cfg: DictConfig) -> dict:
    """Run one analysis over one archive; returns its summary (also written as summary.json)."""
    name = str(cfg.analysis.name)
    analysis = get(name)
    out = Path(str(cfg.paths.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    if not analysis.needs_archive:  # e.g. report: reads other runs' summaries
        summary = analysis.run(cfg, None, out)
    else:
        with Archive(cfg.archive) as a:
            summary = analysis.run(cfg, a, out)
            summary.update(archive=str(a.path), generator=a.generator)
    summary.update(analysis=name, config=OmegaConf.to_container(cfg.analysis, resolve=True))
    summary["summary"] = str(write_json(out, "summary.json", summary))
    return summary


def files_written(out: Path, since: float) -> list[str]:
    """The files this run wrote into its directory (Hydra's own log aside), sorted."""
    return sorted(
        p.name
        for p in out.iterdir()
        if p.is_file() and p.suffix != ".log" and p.stat().st_mtime >= since
    )


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="analyses")
def main(cfg: DictConfig) -> None:
    start = time.time() - 1  # file times can round down
    with user_errors():
        result = run(cfg)
    out = Path(result["summary"]).parent
    print(
        f"{result['analysis']}: {out}"
        + (f"  ({result['archive']})" if result.get("archive") else "")
    )
    for line in get(result["analysis"]).terminal_lines(result):  # the run's headline numbers
        print(f"  {line}")
    if result.get("report"):
        print(f"  report {result['report']}")
    print("  files: " + ", ".join(files_written(out, start)))


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], ("analysis",), options)
    check_launcher(sys.argv[1:])
    main()
