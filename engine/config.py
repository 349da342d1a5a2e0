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


def model_key(mcfg) -> str:
    """The archive group name of a model config: its `key`, or (key: null, as in the generic
    `hf` and `gguf` configs) one derived from what it loads: the hub or directory name's last
    part, or the GGUF file's stem (`model=hf model.name=Qwen/Qwen2.5-0.5B` -> Qwen2.5-0.5B)."""
    if mcfg.get("key"):
        return str(mcfg.key)
    src = str(mcfg.get("path") or "") if mcfg.get("source") == "gguf" else str(mcfg.get("name") or "")
    stem = Path(src.rstrip("/")).name.removesuffix(".gguf")
    if not stem:
        raise EngineError("model.key is null and there is no model.name or model.path to name "
                          "the group after; pass model.key=NAME")
    return stem


def model_config(name: str):
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise EngineError(f"unknown model {name!r}; available: {', '.join(options('model'))}")
    return OmegaConf.load(path)


def model_for(key: str, provenance: dict) -> str:
    """The `model=` override that loads the model an archive group was written by: a config
    whose key is the group's, else one of the same source and name, else the generic source."""
    by_key, by_name = None, None
    for name in options("model"):
        c = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
        if str(c.get("key")) == key:
            by_key = by_key or name
        if c.get("source") == provenance.get("source") and str(c.get("name")) == provenance.get("name"):
            by_name = by_name or name
    if by_key or by_name:
        return f"model={by_key or by_name}"
    source = provenance.get("source", "hf")
    if source == "gguf":
        return f"model=gguf model.path={provenance.get('path', 'FILE.gguf')}"
    return f"model=hf model.name={provenance.get('name', 'NAME')}"
