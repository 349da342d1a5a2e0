"""The core install alone (pyproject.toml's dependencies, no extras) reads and analyses
archives: a fresh venv gets requirements/core.lock (hashes, no dependencies) and the project
(editable, no dependencies), and there torch is not importable while `inspect`, `merge`,
`verify` and the entropy and pair analyses run; a verb that needs a model refuses in one line
naming the extra.

The venv is filled by uv (the Makefile's pinned .venv-tools/bin/uv, else one on PATH) or else
pip, from the network or, offline, from their wheel caches; skipped only when neither has the
wheels.  Editable, so the numba kernels' on-disk cache is the checkout's (kernels/__pycache__,
warm after any test run) and not compiled afresh each time."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CORE_LOCK = ROOT / "requirements" / "core.lock"
V4 = ROOT / "tests" / "data" / "v4-d9aa91f.h5"
OFFLINE = re.compile(
    r"Network connectivity is disabled|Failed to fetch|error sending request|"
    r"dns error|NewConnectionError|Failed to establish a new connection|"
    r"Temporary failure in name resolution|Could not find a version|"
    r"No matching distribution|ProxyError",
    re.IGNORECASE,
)

#: a sharded run of two shards written through the archive writer from numpy arrays alone
WRITE_SHARDS = """
import sys
from pathlib import Path
import numpy as np
from engine import archive
from engine.archive import ModelInfo, Rows
from engine.archive import format as F

out, V, T, n_samples = Path(sys.argv[1]), 64, 6, 2
vocab = [chr(65 + i % 26) for i in range(V)]
for index, (start, stop) in enumerate([(0, 2), (2, 4)]):
    rng = np.random.default_rng(index)
    info = ModelInfo(key="synth", provenance={"source": "synthetic"}, vocab_size=V,
                     prompt_text=["p", "q"], prompt_tokens=[[1, 2], [3]], vocab_strings=vocab,
                     tokenizer_json="")
    w = archive.create(out / f"shard{index}.h5", run_key={"synthetic": 1}, config_yaml="",
                       provenance_root={}, prompts=["p", "q"], n_samples=n_samples,
                       max_new_tokens=T, model=info, codec="fp16", window=24.0, capture_dims={},
                       shard=F.Shard(index=index, count=2, start=start, stop=stop, total=4))
    lengths = np.array([T, T - 2])
    def steps():
        for t in range(T):
            yield Rows(t=t, data=(rng.standard_normal((2, V)) * 3).astype(np.float16),
                       tokens=rng.integers(0, V, 2), alive=t < lengths)
    with w:
        w.write_batch(0, [start, start + 1], steps(), eos_ids=[V - 1])
        w.finish()
print("torch" in sys.modules)
"""


def _uv() -> str | None:
    tools = ROOT / ".venv-tools" / "bin" / "uv"
    return str(tools) if tools.is_file() else shutil.which("uv")


def _install(venv: Path) -> str:
    """Fill `venv` with the core lock and the project; returns the installer used."""
    py = venv / "bin" / "python"
    uv = _uv()
    if uv:
        steps = [
            [uv, "venv", "-q", "--python", sys.executable, str(venv)],
            [
                uv,
                "pip",
                "install",
                "-q",
                "--python",
                str(py),
                "--no-deps",
                "--require-hashes",
                "-r",
                str(CORE_LOCK),
            ],
            [uv, "pip", "install", "-q", "--python", str(py), "--no-deps", "-e", str(ROOT)],
        ]
    else:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--require-hashes",
                "-r",
                str(CORE_LOCK),
            ],
            [str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        ]
    for step in steps:
        res = subprocess.run(step, capture_output=True, text=True, timeout=600)
        if res.returncode and uv and step[1] == "pip":  # offline: uv's cache alone
            res = subprocess.run(
                [*step[:3], "--offline", *step[3:]], capture_output=True, text=True, timeout=600
            )
        if res.returncode:
            out = res.stdout + res.stderr
            if OFFLINE.search(out):
                pytest.skip(
                    f"no network and no cached wheels for the core install "
                    f"({'uv' if uv else 'pip'}): {out.strip().splitlines()[-1]}"
                )
            pytest.fail(f"{' '.join(step[:4])}... failed:\n{out[-3000:]}")
    return "uv" if uv else "pip"


def test_the_core_install_reads_and_analyses_archives_without_torch(tmp_path):
    venv = tmp_path / "core"
    _install(venv)
    py = str(venv / "bin" / "python")

    def run(*args, cwd=tmp_path):
        return subprocess.run([py, *args], cwd=cwd, capture_output=True, text=True, timeout=300)

    res = run(
        "-c",
        "import importlib.util as u, engine; print(engine.__file__); "
        "print([m for m in ('torch', 'transformers', 'transformer_lens', 'trl', "
        "'sklearn', 'datasets') if u.find_spec(m)])",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == [str(ROOT / "engine" / "__init__.py"), "[]"], res.stdout

    # write a sharded run from numpy, merge it, verify it, inspect it
    res = run("-c", WRITE_SHARDS, str(tmp_path))
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]
    merged = tmp_path / "merged.h5"
    res = run("-m", "engine", "merge", str(merged), str(tmp_path / "shard*.h5"), "--no-progress")
    assert res.returncode == 0 and "merged 2 shards (4 samples" in res.stdout, res.stderr[-2000:]
    res = run("-m", "engine", "verify", str(merged), "--no-progress")
    assert res.returncode == 0 and "all match" in res.stdout, res.stdout + res.stderr[-2000:]
    res = run("-m", "engine", "inspect", str(merged), "--render", "--limit", "1")
    assert res.returncode == 0 and "sample 0 (synth" in res.stdout, res.stderr[-2000:]

    # the fixture archive (a generator and a scored twin): inspect, entropy, pair
    res = run("-m", "engine", "inspect", str(V4))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "models   2 (generator: tiny-random)" in res.stdout, res.stdout
    for analysis, keys in (
        ("entropy", {"models", "topk", "entropy_vs_gamma", "figures"}),
        ("pair", {"base", "aligned", "kl_base_aligned", "gamma", "n_rows"}),
    ):
        out = tmp_path / analysis
        res = run(
            "-m",
            "analyses",
            f"analysis={analysis}",
            f"archive={V4}",
            "progress=false",
            f"paths.output_dir={out}",
            f"hydra.run.dir={tmp_path / 'hydra' / analysis}",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["analysis"] == analysis and summary["archive"] == str(V4), summary.keys()
        assert keys <= set(summary), (analysis, sorted(summary))
        assert (out / "per_step.csv").is_file()
        if analysis == "entropy":
            assert set(summary["models"]) == {"tiny-random", "tiny-random-tempered-1.5"}
        else:
            assert (summary["base"], summary["aligned"]) == (
                "tiny-random",
                "tiny-random-tempered-1.5",
            )
            assert summary["n_rows"] == 20

    # what needs an extra says which, in one line, and does not start
    for args, extra in (
        (["-m", "engine", "dump", "model=tiny-random"], "run"),
        (["-m", "engine", "align"], "align"),
        (
            [
                "-m",
                "analyses",
                "analysis=diversity",
                f"archive={V4}",
                f"hydra.run.dir={tmp_path / 'hydra' / 'diversity'}",
            ],
            "text",
        ),
    ):
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        assert f"pip install 'logit-engine[{extra}]'" in res.stderr, res.stderr


def test_require_names_the_missing_modules_and_the_extra():
    from analyses.protocol import EXTRAS as ANALYSIS_EXTRAS
    from engine.commands import VERBS
    from engine.errors import EngineError
    from engine.extras import EXTRAS, require

    for extra in EXTRAS:  # `make setup` installs every extra
        require(extra, "here")
    with pytest.raises(EngineError) as exc:
        require(
            "run",
            "python -m engine dump",
            find_spec=lambda m: None if m in ("gguf", "torch") else object(),
        )
    assert str(exc.value) == (
        "python -m engine dump needs the 'run' extra (torch, gguf not "
        "installed): pip install 'logit-engine[run]'"
    )
    # every verb that loads a model names its extra; the verbs that read archives need none
    assert {v.name for v in VERBS.values() if v.extra} == {
        v.name for v in VERBS.values() if v.hydra
    }
    assert all(
        e in EXTRAS
        for e in [*(v.extra for v in VERBS.values() if v.extra), *ANALYSIS_EXTRAS.values()]
    )
