"""Small things a new user meets first: strict JSON summaries, a bare capture hook, scoring
ids outside a vocabulary, and perturbation renders that say which prefix they read."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from analyses.lib.common import write_json
from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.commands import perturb as perturb_mod
from engine.commands import score as score_mod
from engine.commands.inspect import render
from engine.errors import EngineError
from tests.conftest import compose_cfg


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_summaries_are_strict_json_with_null_for_undefined(tmp_path):
    path = write_json(
        tmp_path,
        "s.json",
        {
            "std": float("nan"),
            "inf": np.inf,
            "x": np.float32(1.5),
            "a": np.array([1.0, np.nan]),
            "n": np.int64(3),
        },
    )
    got = _strict(path.read_text())
    assert got == {"std": None, "inf": None, "x": 1.5, "a": [1.0, None], "n": 3}


def test_every_analysis_summary_parses_strictly(tiny_archive, tmp_path, cache_dir):
    from analyses.__main__ import run as run_analysis

    run_analysis(
        compose_cfg(
            "analyses", tmp_path, cache_dir, ["analysis=entropy", f"archive={tiny_archive}"]
        )
    )
    _strict((tmp_path / "summary.json").read_text())


def test_a_single_capture_hook_needs_no_brackets(dump_cfg, tmp_path):
    res = dump_mod.run(
        dump_cfg(
            "n_samples=1",
            "max_new_tokens=3",
            "capture=blocks.0.hook_resid_post",
            f"out={tmp_path}/c.h5",
        )
    )
    with Archive(res["archive"]) as a:
        assert a.model().activations == ["blocks.0.hook_resid_post"]
    with pytest.raises(EngineError, match="blocks.0.hook_resid_post"):  # the hint names it
        dump_mod.run(
            dump_cfg(
                "n_samples=1", "max_new_tokens=3", "capture=blocks.0.nope", f"out={tmp_path}/d.h5"
            )
        )


def test_scoring_ids_outside_the_vocabulary_is_one_error_and_writes_nothing(
    dump_cfg, tmp_path, cache_dir
):
    src = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=4", f"out={tmp_path}/s.h5"))[
        "archive"
    ]
    with h5py.File(src, "r+") as f:  # as if sampled by a model with a larger vocabulary
        t = f["samples/tokens"][()]
        t[0, 1] = 300
        f["samples/tokens"][...] = t
    cfg = compose_cfg(
        "score",
        tmp_path,
        cache_dir,
        [f"archive={src}", "model=tiny-random", "model.key=other", "allow_tokenizer_mismatch=true"],
    )
    with pytest.raises(EngineError, match="token id 300, outside"):
        score_mod.run(cfg)
    with h5py.File(src, "r") as f:
        assert list(f["models"]) == ["tiny-random"]


def test_perturbation_renders_name_variant_parent_and_edit(dump_cfg, tmp_path, cache_dir):
    src = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=6", f"out={tmp_path}/src.h5"))[
        "archive"
    ]
    out = perturb_mod.run(
        compose_cfg(
            "perturb",
            tmp_path,
            cache_dir,
            [
                f"source={src}",
                "model=tiny-random",
                "parents=[1]",
                "cut_after=null",
                "cut_at=2",
                "edit.replace=null",
                "edit.insert=Q",
                "n_samples=3",
                "max_new_tokens=4",
                f"out={tmp_path}/p.h5",
            ],
        )
    )["archive"]
    with Archive(out) as a:
        text = render(a, a.model(), [0, 3])
    blocks = text.split("--- sample ")[1:]
    assert blocks[0].startswith(
        "0 (tiny-random, prompt 0, control of parent 1 (cut 2): unperturbed prefix"
    )
    assert blocks[1].startswith("3 (tiny-random, prompt 1, edit of parent 1 (cut 2): insert 'Q'")


# ---- hub, launchers, prompt files, model names (issue: the first hour of a new user) ----------
def test_unreachable_hub_fails_in_seconds_with_the_fixes(monkeypatch, tmp_path):
    """The network is made unavailable here (no request leaves the test)."""
    import socket
    import time

    from engine.runtime import models
    from engine.runtime.settings import model_config

    def no_network(*a, **kw):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty local cache
    mcfg = model_config("llama2-7b")
    t = time.perf_counter()
    with pytest.raises(EngineError) as e:
        models.load_hf_source(mcfg, tmp_path)
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and "unreachable" in msg and "meta-llama/Llama-2-7b-hf" in msg
    for fix in ("HF_TOKEN", "HF_HUB_OFFLINE=1", "model.name=/path"):
        assert fix in msg, msg


def test_missing_launcher_plugin_is_named_in_one_line(capsys):
    from engine.cli import check_launcher

    with pytest.raises(SystemExit) as e:
        check_launcher(["-m", "hydra/launcher=slurm", "analysis=entropy"], find_spec=lambda m: None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hydra-submitit-launcher" in err[0], err
    check_launcher(["hydra/launcher=local"])  # installed by make setup: no exit


def test_blank_lines_of_a_prompt_file_are_reported(tmp_path, caplog):

    from engine.runtime.prompts import load_prompts

    path = tmp_path / "p.txt"
    path.write_text("first\n\n   \nsecond\n")
    with caplog.at_level("WARNING"):
        got = load_prompts([], str(path))
    assert got == ["first", "second"]
    assert "2 blank line(s) skipped, 2 prompts read" in caplog.text


def test_generic_model_configs_are_named_after_what_they_load():
    from omegaconf import OmegaConf

    from engine.runtime.settings import model_key

    hf = OmegaConf.create({"key": None, "source": "hf", "name": "Qwen/Qwen2.5-0.5B-Instruct"})
    gguf = OmegaConf.create(
        {"key": None, "source": "gguf", "name": "gguf", "path": "/m/tiny.Q8_0.gguf"}
    )
    assert model_key(hf) == "Qwen2.5-0.5B-Instruct" and model_key(gguf) == "tiny.Q8_0"
    assert model_key(OmegaConf.create({"key": "mine", "source": "hf", "name": "a/b"})) == "mine"


def test_perturb_names_the_model_that_wrote_the_archive(tiny_archive):
    from tests.conftest import engine_cli

    res = engine_cli("perturb", f"source={tiny_archive}", "progress=false")
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert "sampled by tiny-random" in err[0] and "pass model=tiny-random" in err[0], err[0]


def test_benches_say_where_their_real_rows_archive_lives(tmp_path, monkeypatch, capsys):
    """bench.codecs and bench.kernels keep a ~100 MB dump under outputs/bench/: they say so,
    when they write it and when they reuse it."""
    import bench.common as bc

    calls = []

    def fake_dump(cmd, cwd, check):
        out = next(a for a in cmd if a.startswith("out="))[4:]
        open(out, "wb").write(b"x" * 2**20)
        calls.append(cmd)

    monkeypatch.setattr(bc, "ROOT", tmp_path)
    monkeypatch.setattr(bc.subprocess, "run", fake_dump)
    (tmp_path / "outputs" / "bench").mkdir(parents=True)
    path = bc.real_archive("r.h5", "n_samples=4")
    assert path == tmp_path / "outputs" / "bench" / "r.h5" and len(calls) == 1
    assert f"dumping SmolLM2 into {path}" in capsys.readouterr().out
    assert bc.real_archive("r.h5", "n_samples=4") == path and len(calls) == 1  # reused
    assert f"reusing {path} (1 MiB; delete it" in capsys.readouterr().out


def test_an_archive_another_process_writes_is_one_line_and_left_alone(tiny_archive, tmp_path):
    """HDF5 locks a file while a process writes it: a second `score` (or a `layers`, or a
    reader) on it is refused with one line, not errno 11's traceback, and the file is
    untouched."""
    import shutil

    from tests.conftest import engine_cli

    path = tmp_path / "busy.h5"
    shutil.copy(tiny_archive, path)
    before = path.read_bytes()
    with h5py.File(path, "r+"):  # this process is writing it
        for args in (
            ("score", f"archive={path}", "model=tiny-random", "model.seed=1"),
            ("inspect", str(path)),
        ):
            r = engine_cli(*args, cwd=tmp_path)
            assert r.returncode == 2, r.stderr
            assert r.stderr.strip().count("\n") == 0 and "is open in another process" in r.stderr
    assert path.read_bytes() == before
