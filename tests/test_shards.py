"""Sharded dumps and `merge`: shards are exactly the single-process run's samples, a merged
archive (virtual or copied) reads as that archive through every reader, inspect, score,
perturb and the analyses; refusals are one line; a real multirun on Hydra's submitit_local
launcher (subprocesses), with one shard SIGKILLed and resumed alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from analyses.__main__ import run as run_analysis
from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.commands import perturb as perturb_mod
from engine.commands import score as score_mod
from engine.commands.inspect import main as inspect_main
from engine.commands.merge import merge
from engine.errors import EngineError
from tests.conftest import ROOT, compose_cfg, compose_dump, engine_cli
from tests.test_analyses import analysis_cfg

#: q16 with a captured hook and the lens: every per-sample dataset kind a model group can have
SETTINGS = [
    "model=tiny-random",
    "n_samples=5",
    "batch_size=2",
    "max_new_tokens=9",
    "codec=q16",
    "capture=[blocks.0.hook_resid_post]",
    "lens=true",
]
TEMPERED = ["model=tempered", "model.base=tiny-random", "model.gamma=1.7", "batch_size=2"]


def datasets(path) -> dict[str, np.ndarray]:
    """Every dataset of a file, read in full (with plain h5py: virtual ones included);
    variable-length rows as tuples."""
    out = {}

    def read(name, obj):
        if isinstance(obj, h5py.Dataset):
            data = np.asarray(obj[()])
            if data.dtype == object:
                data = np.array(
                    [tuple(x) if isinstance(x, np.ndarray) else x for x in data.ravel()] + [None],
                    dtype=object,
                )[:-1]
            out[name] = data

    with h5py.File(path, "r") as f:
        f.visititems(read)
    return out


def assert_same_archive(got, want):
    a, b = datasets(got), datasets(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    with h5py.File(got, "r") as f, h5py.File(want, "r") as g:
        for k in (
            "n_samples",
            "n_complete",
            "complete",
            "run_key",
            "generator",
            "n_prompts",
            "samples_per_prompt",
            "max_new_tokens",
            "format_version",
        ):
            assert f.attrs[k] == g.attrs[k], k
        assert "shard" not in f.attrs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One single-process dump and the same run as 3 shards (2 prompts x 5 samples in batches
    of 2 on the across-prompts grid: the shards take 1 + 2 + 2 batches, and batch 4..5 reads
    both prompts, left-padded)."""
    tmp = tmp_path_factory.mktemp("shards")
    single = dump_mod.run(compose_dump(tmp / "single", cache_dir, SETTINGS))["archive"]
    shards = [
        dump_mod.run(
            compose_dump(tmp / f"shard{i}", cache_dir, [*SETTINGS, f"shard={i}", "num_shards=3"])
        )["archive"]
        for i in range(3)
    ]
    return tmp, Path(single), [Path(s) for s in shards]


def test_shards_hold_the_single_runs_samples(runs):
    _, single, shards = runs
    want = datasets(single)
    spans = []
    for path in shards:
        got = datasets(path)
        with Archive(path) as a:
            lo, hi = a.span
            spans.append((lo, hi))
            assert a.n_samples == hi - lo and a.shard.total == 10
        for name, data in got.items():
            if (
                data.ndim
                and data.shape[0] == hi - lo
                and name.split("/")[0] in ("samples", "models")
                and not name.endswith(("prompt_text", "prompt_tokens", "vocab"))
            ):
                assert np.array_equal(data, want[name][lo:hi]), name  # seeds, tokens, rows
    assert spans == [(0, 2), (2, 6), (6, 10)]


def test_merged_archives_read_as_the_single_one(runs, capsys):
    tmp, single, shards = runs
    virtual = merge(tmp / "merged.h5", [str(tmp / "shard*/logits.h5")], progress=False)
    copied = merge(tmp / "copied.h5", [str(s) for s in shards], copy=True, progress=False)
    assert virtual["virtual"] and not copied["virtual"]
    for out in (virtual, copied):
        assert_same_archive(out["archive"], single)
    with Archive(tmp / "merged.h5") as m, Archive(single) as s:
        assert [r["index"] for r in m.merged_from] == [0, 1, 2]
        assert all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in m.merged_from)
        assert m.model().chunk_steps == s.model().chunk_steps
        assert m.model().storage_bytes == s.model().storage_bytes
        blocks = [(b.sample, b.steps.tolist(), b.raw.tobytes()) for b in m.iter_rows()]
        assert blocks == [(b.sample, b.steps.tolist(), b.raw.tobytes()) for b in s.iter_rows()]
    # inspect: the same report but for the file's own lines (path, creation, shard records)
    outputs = {}
    for path in (single, tmp / "merged.h5", tmp / "copied.h5"):
        for args in ([], ["--sample", "6", "--step", "4"], ["--render", "--color", "never"]):
            assert inspect_main([str(path), *args]) == 0
            lines = capsys.readouterr().out.splitlines()
            outputs.setdefault(tuple(args), []).append(
                [
                    ln
                    for ln in lines
                    if not ln.startswith(("archive ", "created ", "merged ", "  tiny-random:"))
                ]
            )
    for args, (want, *got) in outputs.items():
        assert all(g == want for g in got), args


def test_analyses_on_a_merged_archive_match_the_single_one(runs, tmp_path, cache_dir):
    tmp, single, shards = runs
    archives = {}
    for name, src in (("single", [single]), ("merged", shards)):
        d = tmp_path / name
        d.mkdir()
        for s in src:  # score each shard (or the single archive) with the tempered twin
            (d / s.parent.name).mkdir()
            shutil.copy(s, d / s.parent.name / s.name)
            score_mod.run(
                compose_cfg(
                    "score", d, cache_dir, [f"archive={d / s.parent.name / s.name}", *TEMPERED]
                )
            )
        archives[name] = (
            d / s.parent.name / s.name
            if name == "single"
            else Path(
                merge(d / "merged.h5", [str(d / "shard*/logits.h5")], progress=False)["archive"]
            )
        )
    assert_same_archive(archives["merged"], archives["single"])
    for analysis in ("entropy", "pair", "diversity", "personas"):  # every one a dump feeds
        summaries = []
        for name, path in archives.items():
            out = tmp_path / f"{analysis}-{name}"
            run_analysis(analysis_cfg(out, f"analysis={analysis}", f"archive={path}"))
            summaries.append(
                json.loads(
                    (out / "summary.json")
                    .read_text()
                    .replace(str(path), "ARCHIVE")
                    .replace(str(out), "OUT")
                )
            )
        assert summaries[0] == summaries[1], analysis


def test_score_and_perturb_work_on_a_merged_archive(runs, tmp_path, cache_dir):
    tmp, single, shards = runs
    ref = tmp_path / "single.h5"
    shutil.copy(single, ref)
    (tmp_path / "m").mkdir()
    for s in shards:  # a merged archive next to copies of the shards
        (tmp_path / "m" / s.parent.name).mkdir()
        shutil.copy(s, tmp_path / "m" / s.parent.name / s.name)
    merged = merge(
        tmp_path / "m" / "merged.h5", [str(tmp_path / "m/shard*/logits.h5")], progress=False
    )["archive"]
    for path in (ref, merged):  # scoring writes a real group into the merged file
        score_mod.run(compose_cfg("score", tmp_path, cache_dir, [f"archive={path}", *TEMPERED]))
    assert_same_archive(merged, ref)
    outs = []
    for path in (ref, merged):
        outs.append(
            perturb_mod.run(
                compose_cfg(
                    "perturb",
                    tmp_path,
                    cache_dir,
                    [
                        f"source={path}",
                        "model=tiny-random",
                        "parents=[6]",
                        "cut_after=null",
                        "cut_at=3",
                        "edit.replace=null",
                        "edit.delete=1",
                        "n_samples=2",
                        "max_new_tokens=6",
                        f"out={tmp_path}/perturb-{Path(path).stem}.h5",
                    ],
                )
            )["archive"]
        )
    a, b = datasets(outs[0]), datasets(outs[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_merge_refusals_are_one_line(runs, tmp_path, cache_dir):
    tmp, single, shards = runs
    other = dump_mod.run(
        compose_dump(
            tmp_path / "other", cache_dir, [*SETTINGS, "seed=1", "shard=2", "num_shards=3"]
        )
    )["archive"]
    halves = [
        dump_mod.run(
            compose_dump(
                tmp_path / f"half{i}", cache_dir, [*SETTINGS, f"shard={i}", "num_shards=2"]
            )
        )["archive"]
        for i in range(2)
    ]
    partial = tmp_path / "p" / "logits.h5.partial"
    partial.parent.mkdir()
    shutil.copy(shards[2], partial)
    out = str(tmp_path / "out.h5")
    s = [str(p) for p in shards]
    cases = [
        ([s[0], s[1], other], "comes from a different run than .* \\(settings differ: seed\\)"),
        ([s[0], s[1]], "samples 6..9 of 10 are missing"),
        ([s[0], s[2]], "samples 2..5 of 10 are missing"),
        ([halves[0], s[1], s[2]], "samples 2..3 are in two shards"),
        ([s[0], s[1], str(partial)], "is still .partial"),
        ([s[0], s[1], str(partial.with_suffix(""))], "is still .partial"),
        ([str(single)], "is not a shard"),
        ([str(tmp_path / "none*.h5")], "no file matches"),
    ]
    for args, msg in cases:
        with pytest.raises(EngineError, match=msg):
            merge(out, args, progress=False)
        assert not Path(out).exists() and not Path(out + ".partial").exists()
    merge(out, [*halves], progress=False)  # 2 shards of the same run merge too ...
    assert_same_archive(out, single)
    r = engine_cli("merge", out, *halves)  # ... once: the CLI refuses to overwrite
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "exists" in r.stderr
    # a merged archive whose shard moved: one line, not silently zero rows
    os.rename(halves[1], halves[1] + ".moved")
    r = engine_cli("inspect", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "is missing" in r.stderr and "merge --copy" in r.stderr


def test_shard_settings_are_checked(dump_cfg):
    with pytest.raises(EngineError, match="num_shards=7 is more than the run's 5 batches"):
        dump_mod.run(dump_cfg("n_samples=5", "batch_size=2", "shard=0", "num_shards=7"))
    with pytest.raises(EngineError, match="shard must be an integer in 0..2"):
        dump_mod.run(dump_cfg("shard=3", "num_shards=3"))
    with pytest.raises(EngineError, match="num_shards must be a positive integer"):
        dump_mod.run(dump_cfg("num_shards=0"))


def test_each_shard_takes_its_own_gpu_when_it_sees_several(dump_cfg, monkeypatch):
    """device=auto or cuda: shard i of a job that sees 4 GPUs takes cuda:i % 4; one visible
    GPU (SLURM) or an explicit cuda:N is left alone."""
    import torch

    from engine.archive import Shard
    from engine.runtime import run as R
    from engine.runtime.settings import RunSettings

    cfg = dump_cfg()
    four = ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    for n_gpus, device, want in (
        (4, "auto", four),
        (4, "cuda", four),
        (1, "auto", ["auto"] * 5),
        (1, "cuda", ["cuda"] * 5),
        (4, "cuda:2", ["cuda:2"] * 5),
    ):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
        rs = RunSettings.from_cfg(cfg).with_(device=device)
        got = [R.shard_device(rs, Shard(i, 5, 0, 1, 5)).device for i in range(5)]
        assert got == want
    rs = RunSettings.from_cfg(cfg).with_(device="auto")
    assert R.shard_device(rs, None).device == "auto"  # not sharded: untouched


def test_resume_true_without_an_earlier_partial_is_one_line(tmp_path, cache_dir):
    r = engine_cli(
        "dump",
        "model=tiny-random",
        "n_samples=2",
        "max_new_tokens=4",
        "resume=true",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}/runs/now",
        f"hydra.sweep.dir={tmp_path}/sweeps/now",
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no interrupted run with these settings" in r.stderr


# ---- a real multirun: Hydra's submitit_local launcher starts one subprocess per shard --------
MULTIRUN = [
    "model=tiny-random",
    "n_samples=8",
    "batch_size=2",
    "max_new_tokens=48",
    "progress=false",
]


def multirun(sweep: Path, cache: Path, shards: str = "0,1", *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine",
        "dump",
        "-m",
        *MULTIRUN,
        f"shard={shards}",
        "num_shards=2",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={cache}",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    """The same run in one process."""
    tmp = tmp_path_factory.mktemp("single")
    return Path(dump_mod.run(compose_dump(tmp, cache_dir, MULTIRUN))["archive"])


def holder(path: Path) -> int | None:
    """Pid of the process that has `path` open (the shard's job), if any."""
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(path):
                return int(fd.parent.parent.name)
        except OSError:
            continue
    return None


def committed(path: Path) -> int | None:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["n_complete"])
    except Exception:  # caught between two writes: try again
        return None


def test_submitit_local_multirun_merges_into_the_single_archive(tmp_path, cache_dir, reference):
    r = subprocess.run(
        multirun(tmp_path / "sweep", cache_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Submitit 'local' sweep" in r.stdout + r.stderr
    r = engine_cli("merge", str(tmp_path / "merged.h5"), str(tmp_path / "sweep/*/logits.h5"))
    assert r.returncode == 0, r.stderr
    assert_same_archive(tmp_path / "merged.h5", reference)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the shard's job in /proc")
def test_a_killed_shard_resumes_alone_and_merges_into_the_single_archive(
    tmp_path, cache_dir, reference
):
    """SIGKILL shard 1's job once it has committed some but not all of its batches (the job is
    stopped while we look, so the kill lands mid-run); the multirun fails, shard 0 is done;
    `-m shard=1 ... resume=true` finds shard 1's partial in the earlier sweep and finishes it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        multirun(sweep, cache_dir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial, killed, deadline = sweep / "1" / "logits.h5.partial", None, time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        pid = holder(partial) if partial.exists() else None
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
            n = committed(partial)
            if n is not None and 0 < n < 8:
                os.kill(pid, signal.SIGKILL)
                killed = n
                break
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, f"shard 1 finished before it could be killed: {err[-1000:]}"
    assert proc.returncode != 0
    assert (sweep / "0" / "logits.h5").exists() and not (sweep / "1" / "logits.h5").exists()
    assert committed(partial) == killed
    r = subprocess.run(
        multirun(tmp_path / "again", cache_dir, "1", "resume=true"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "again" / "0" / "dump.log").read_text()
    assert f"resuming {partial} at sample {killed}" in log, log
    assert (sweep / "1" / "logits.h5").exists() and not partial.exists()
    r = engine_cli("merge", str(tmp_path / "merged.h5"), str(sweep / "*/logits.h5"))
    assert r.returncode == 0, r.stderr
    assert_same_archive(tmp_path / "merged.h5", reference)


def test_scale_bench_stays_runnable(tmp_path):
    """bench/scale.py at toy size: writes, merges, analyses, reports, cleans up."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scale",
            "--prompts",
            "2",
            "--per-prompt",
            "3",
            "--steps",
            "8",
            "--vocab",
            "512",
            "--mem-rows",
            "16",
            "--dir",
            str(tmp_path / "scale"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for where in ("one archive", "2 shards merged (virtual)"):
        for analysis in ("entropy ", "pair    "):
            for cache in ("cold", "warm"):
                assert f"{analysis} on {where}, {cache}" in r.stdout, r.stdout
    assert r.stdout.count("of kernel throughput") == 8 and not (tmp_path / "scale").exists()
