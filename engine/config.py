"""Where the Hydra config groups live and which options each group has (model configs are
read through their schema, `engine.runtime.settings.ModelSpec`).

The configs ship inside the package (`engine/conf/`, package data), so a non-editable
install finds them; the repository's top-level `conf` is a link to the same folder.
"""

from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))
