"""Where the Hydra config groups live, and loading one model config by name (for sources that
refer to another model, such as `tempered`).

The configs ship inside the package (`engine/conf/`, package data), so a non-editable
install finds them; the repository's top-level `conf` is a link to the same folder.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from engine.errors import EngineError

CONF = Path(__file__).resolve().parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def model_config(name: str):
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise EngineError(f"unknown model {name!r}; available: {', '.join(options('model'))}")
    return OmegaConf.load(path)
