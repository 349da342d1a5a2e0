"""Shared fixtures: Hydra-composed dump configs pointed at tmp paths, and small archives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analyses.protocol import CONF as ANALYSES_CONF
from engine.commands.dump import run
from engine.config import CONF

ROOT = Path(__file__).resolve().parent.parent
#: where tests run models: the GPU when there is one (a GPU machine's `make test` exercises it),
#: else the CPU; LOGIT_ENGINE_TEST_DEVICE=cpu|cuda:N overrides
DEVICE = os.environ.get("LOGIT_ENGINE_TEST_DEVICE", "auto")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One model cache per test session (the SmolLM2 dequantization runs once)."""
    return Path(os.environ.get("LOGIT_ENGINE_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


def compose_cfg(name: str, tmp: Path, cache: Path, overrides=()):
    """conf/<name>.yaml (analyses: analyses/conf/analyses.yaml) composed through Hydra, writing
    under tmp, models cached in cache."""
    conf = ANALYSES_CONF if name == "analyses" else CONF
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(
            name,
            overrides=[
                f"paths.output_dir={tmp}",
                f"paths.cache_dir={cache}",
                "progress=false",
                *overrides,
            ],
        )


def compose_dump(tmp: Path, cache: Path, overrides=()):
    return compose_cfg("dump", tmp, cache, overrides)


def tempered_pair(tmp: Path, cache: Path, n_samples: int, max_new_tokens: int) -> Path:
    """A tiny-random archive (fp32) scored by its tempered twin (gamma 1.7: the twin is the
    base at power 1.7 token by token, the planted truth of the gamma and mitigation tests)."""
    from engine.commands import score

    path = compose_and_dump(tmp, cache, n_samples, max_new_tokens)
    score.run(
        compose_cfg(
            "score",
            tmp,
            cache,
            [f"archive={path}", "model=tempered", "model.base=tiny-random", "model.gamma=1.7"],
        )
    )
    return Path(path)


def compose_and_dump(tmp: Path, cache: Path, n_samples: int, max_new_tokens: int) -> str:
    return run(
        compose_dump(
            tmp,
            cache,
            [
                "model=tiny-random",
                f"n_samples={n_samples}",
                f"max_new_tokens={max_new_tokens}",
                "codec=fp32",
            ],
        )
    )["archive"]


@pytest.fixture
def dump_cfg(tmp_path, cache_dir):
    def make(*overrides):
        return compose_dump(tmp_path, cache_dir, ["model=tiny-random", *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, cache_dir) -> Path:
    """A tiny-random archive (2 prompts x 3 samples x 12 steps, fp32), built once."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = compose_dump(
        tmp,
        cache_dir,
        ["model=tiny-random", "n_samples=3", "batch_size=2", "max_new_tokens=12", "codec=fp32"],
    )
    return Path(run(cfg)["archive"])


def engine_cli(*args, cwd=None, timeout=300, env=None):
    """Run `python -m engine ...` in a subprocess; returns CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def tiny_answers(tmp: Path, cache: Path, out: Path) -> str:
    """A candidate-answer archive of tiny-random: prompt 'Hi', candidates ab, abc, b (no
    reference weights), raw text."""
    from engine.commands import answers

    overrides = [
        "model=tiny-random",
        "candidates.prompt='Hi'",
        "candidates.candidates=[ab,abc,b]",
        "candidates.reference=null",
        "chat_template=false",
        f"out={out}",
    ]
    return answers.run(compose_cfg("answers", tmp, cache, overrides))["archive"]
