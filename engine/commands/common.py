"""What the Hydra verbs do with their `DictConfig` before handing typed settings down: the
run key (the settings that decide an archive's content) and the config an archive records.
Not a verb (`engine.commands.VERBS` lists those)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf, open_dict


def run_key(cfg: DictConfig, keys: Iterable[str], **extra) -> dict:
    """Settings that decide an archive's content (the model always among them); a resumed run
    must match them exactly."""
    out = {
        k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys
    }
    out["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    return {**out, **extra}


def config_yaml(cfg: DictConfig, **shape) -> str:
    """The command's whole config as the archive records it (`shape`: keys the command
    decides itself, such as answers' number of candidates)."""
    if shape:
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            for k, v in shape.items():
                cfg[k] = v
    return OmegaConf.to_yaml(cfg, resolve=True)
