"""Typed settings (engine/runtime/settings.py): every shipped model config fits the schema, a
typo in a model key is one line at start-up (in a config file or on the command line), and
the sampling and run settings refuse bad values before anything loads."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from engine.config import CONF, options
from engine.errors import EngineError
from engine.runtime.settings import (
    ModelSpec,
    Output,
    RunSettings,
    Sampling,
    check_model_overrides,
    model_config,
)
from tests.conftest import engine_cli


@pytest.mark.parametrize("name", options("model"))
def test_every_model_config_fits_the_schema(name):
    node = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    for key in missing:  # `???`: given on the command line (model.name=NAME)
        node[key] = "given"
    spec = ModelSpec.from_node(node)
    raw = OmegaConf.to_container(node, resolve=True)
    assert spec.record == raw  # run keys store the config as given
    assert spec.source == raw["source"] and spec.group
    if not missing:
        assert model_config(name) == spec


def test_an_unknown_model_key_is_refused_with_the_nearest_one():
    with pytest.raises(EngineError, match=r"no key 'dtyp' \(did you mean 'dtype'\?\)"):
        ModelSpec.from_node(OmegaConf.create({"source": "hf", "name": "a/b", "dtyp": "auto"}))
    with pytest.raises(EngineError, match="unknown model source 'hff'"):
        ModelSpec.from_node({"source": "hff", "name": "a/b"})
    with pytest.raises(
        EngineError, match=r"model\.dtyp: no such model setting \(did you mean model\.dtype\?\)"
    ):
        check_model_overrides(["n_samples=2", "+model.dtyp=float32"])
    check_model_overrides(["model.dtype=float32", "model=tiny-random", "prompts.texts=[a]"])


def test_a_model_key_typo_on_the_command_line_is_one_line_and_nothing_loads(tmp_path):
    r = engine_cli(
        "dump",
        "model=tiny-random",
        "model.dtyp=float32",
        f"out={tmp_path}/x.h5",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: model.dtyp: no such model setting (did you mean model.dtype?); a model config "
        "has: source, name, key, path, revision, dtype, seed, build, build_command, base, gamma"
    ]
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()


def test_settings_are_checked_once_where_the_command_starts(dump_cfg):
    cfg = dump_cfg()
    s, rs = Sampling.from_cfg(cfg), RunSettings.from_cfg(cfg)
    assert (s.n_samples, s.max_new_tokens, s.on_nonfinite) == (
        cfg.n_samples,
        cfg.max_new_tokens,
        "fail",
    )
    assert rs.codec.codec == cfg.codec and rs.batch_size == cfg.batch_size
    for bad, msg in (
        ("n_samples=0", "n_samples must be a positive integer"),
        ("temperature=0", "temperature must be > 0"),
        ("top_p=1.5", r"top_p must be in \(0, 1\]"),
        ("on_nonfinite=skip", "on_nonfinite must be one of fail, record"),
    ):
        with pytest.raises(EngineError, match=msg):
            Sampling.from_cfg(dump_cfg(bad))
    with pytest.raises(EngineError, match="batch_size must be a positive integer or auto"):
        RunSettings.from_cfg(dump_cfg("batch_size=0"))
    with pytest.raises(EngineError, match="codec"):
        RunSettings.from_cfg(dump_cfg("codec=fp8"))
    o = Output.from_cfg(dump_cfg("resume=True"))
    assert o.resume is True and o.out.name == "logits.h5"
