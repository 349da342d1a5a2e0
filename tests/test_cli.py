"""Entry points as a user runs them: one-line errors, SIGKILL + resume, inspect."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.commands.verify import verify
from engine.errors import EngineError
from tests.conftest import ROOT, engine_cli


def dump_args(tmp_path, cache_dir, *extra):
    return [
        "dump",
        "model=tiny-random",
        f"paths.cache_dir={cache_dir}",
        "progress=false",
        f"hydra.run.dir={tmp_path}/hydra",
        *extra,
    ]


def assert_one_line_error(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    assert needle in err[0], err[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["model=no-such-model"], "unknown model 'no-such-model'"),
        (["prompts=nope"], "unknown prompts"),
        (["n_samples=0"], "n_samples"),
        (["temperature=0"], "temperature"),
        (["max_new_tokens=-3"], "max_new_tokens"),
        (["chat_template=maybe"], "chat_template must be true, false or auto"),
        (["chat_template=true"], "tokenizer has no chat template"),
        (["prompts=file", "prompts.file=/nonexistent/prompts.txt"], "prompt file not found"),
        (["prompts.take=0"], "prompts.take must be a positive integer or null, got 0"),
        (["model=gguf", "model.path=/nonexistent/m.gguf"], "GGUF file not found"),
    ],
)
def test_bad_dump_input_gets_one_line(tmp_path, cache_dir, extra, needle):
    out = tmp_path / "a.h5"
    res = engine_cli(*dump_args(tmp_path, cache_dir, f"out={out}", *extra))
    assert_one_line_error(res, needle)
    assert not out.exists() and not (tmp_path / "a.h5.partial").exists()


def test_prompts_take_keeps_the_first_n():
    from engine.runtime.prompts import load_prompts

    assert load_prompts(["a", "b", "c"], None, 2) == ["a", "b"]
    assert load_prompts(["a", "b"], None, 5) == ["a", "b"]
    assert load_prompts(["a", "b"], None, None) == ["a", "b"]
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(EngineError, match="prompts.take must be a positive integer"):
            load_prompts(["a"], None, bad)


def test_unreachable_hub_model_gets_one_line(tmp_path, cache_dir):
    res = engine_cli(
        *dump_args(
            tmp_path,
            cache_dir,
            f"out={tmp_path}/a.h5",
            "model=hf",
            "model.name=no-such-org/no-such-model-xyz",
        ),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert_one_line_error(
        res,
        "model 'no-such-org/no-such-model-xyz' is not in the local Hugging Face cache (offline)",
    )


def test_existing_archive_survives_cli_without_overwrite(tmp_path, cache_dir):
    out = tmp_path / "keep.h5"
    out.write_bytes(b"keep me")
    res = engine_cli(*dump_args(tmp_path, cache_dir, f"out={out}", "n_samples=1"))
    assert_one_line_error(res, "overwrite=true")
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"not hdf5 at all", "not an HDF5 file"),
        (None, "not a logit archive"),
    ],
)
def test_inspect_rejects_foreign_files(tmp_path, content, needle):
    path = tmp_path / "f.h5"
    if content is None:
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(3)
    else:
        path.write_bytes(content)
    assert_one_line_error(engine_cli("inspect", str(path)), needle)


def test_inspect_rejects_truncated_and_newer_archives(tiny_archive, tmp_path):
    data = tiny_archive.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(engine_cli("inspect", str(cut)), "cannot read")
    newer = tmp_path / "newer.h5"
    newer.write_bytes(data)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 99
    assert_one_line_error(engine_cli("inspect", str(newer)), "format_version 99")


def test_inspect_summary_topk_and_render(tiny_archive):
    res = engine_cli("inspect", str(tiny_archive))
    assert res.returncode == 0, res.stderr
    assert (
        "tiny-random" in res.stdout and "codec=fp32" in res.stdout and "Grace Hopper" in res.stdout
    )
    res = engine_cli("inspect", str(tiny_archive), "--sample", "1", "--step", "2", "--topk", "4")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    probs = [float(l.split("p=")[1].split()[0]) for l in lines if l.strip()[:1].isdigit()]
    assert len(probs) == 4 and probs == sorted(probs, reverse=True)
    # the printed entropy equals an independent float64 computation on the stored row
    with Archive(tiny_archive) as a:
        x = a.model().rows(1, 2).astype(np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    h = -np.sum(p * np.log(p))
    assert f"entropy {h:.4f} nats" in res.stdout
    res = engine_cli("inspect", str(tiny_archive), "--render", "--sample", "0")
    assert res.returncode == 0 and "\x1b" not in res.stdout and "⟩" in res.stdout  # a pipe
    res = engine_cli("inspect", str(tiny_archive), "--render", "--sample", "0", "--color", "always")
    assert res.returncode == 0 and "\x1b[48;2;" in res.stdout
    assert_one_line_error(engine_cli("inspect", str(tiny_archive), "--sample", "1"), "needs --step")
    assert_one_line_error(
        engine_cli("inspect", str(tiny_archive), "--sample", "99"), "out of range"
    )


def _n_complete(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs["n_complete"])
    except (OSError, KeyError):
        return -1


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, cache_dir, dump_cfg):
    settings = ["n_samples=24", "batch_size=2", "max_new_tokens=40", "seed=3"]
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *dump_args(tmp_path, cache_dir, f"out={out}", *settings)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while _n_complete(partial) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert partial.exists() and not out.exists()
    done = _n_complete(partial)
    assert 4 <= done < 48, done
    with Archive(partial, allow_partial=True) as a:
        kept_tokens = a.samples()["tokens"].copy()
        kept_logits = a.model().logits[:done]

    res = engine_cli(*dump_args(tmp_path, cache_dir, f"out={out}", *settings, "resume=true"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.exists() and not partial.exists()

    ref = dump_mod.run(dump_cfg(*settings, f"out={tmp_path}/ref.h5"))
    with Archive(out) as a, Archive(ref["archive"]) as b:
        sa, sb = a.samples(), b.samples()
        assert np.array_equal(sa["tokens"][:done], kept_tokens), "completed samples changed"
        for k in ("tokens", "length", "seed", "finish_reason"):
            assert np.array_equal(sa[k], sb[k]), k
        la, lb = a.model().logits[()], b.model().logits[()]
        assert np.array_equal(la, lb)
        assert np.array_equal(la[:done], kept_logits)
        # the resumed batches were hashed as they were written, the kept ones left as they were
        assert np.array_equal(a.model().checksums(a.n_samples), b.model().checksums(b.n_samples))
    assert verify(out, progress=False).ok


def _ctrl_c_when(path_glob, cwd, args, at_least=2, timeout=120):
    """Start `python -m engine args` in cwd and SIGINT it once a partial matching path_glob
    has at_least committed samples (or has existed for 2 s: a partial being written can fail
    to open for reading now and then); returns (returncode, stderr)."""
    # a terminal's Ctrl-C: the child gets SIGINT's default action even if this process
    # ignores it (children inherit "ignore")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline, seen = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        hits = list(cwd.glob(path_glob))
        if hits:
            seen = seen or time.time()
            if _n_complete(hits[0]) >= at_least or time.time() - seen > 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _interrupted_dump(tmp_path, settings):
    """A dump interrupted mid-run: (its cwd, n_samples, stderr).  A run that finished before
    the signal arrived is retried longer."""
    for n in (32, 128, 512):
        cwd = tmp_path / f"n{n}"
        cwd.mkdir()
        rc, err = _ctrl_c_when(
            "outputs/dump/*/logits.h5.partial", cwd, ["dump", *settings, f"n_samples={n}"]
        )
        if rc == 130:
            return cwd, n, err
        assert rc == 0, err[-2000:]  # finished first: try a longer run
    raise AssertionError("no run could be interrupted")


def test_ctrl_c_prints_the_exact_command_that_continues(tmp_path, cache_dir, dump_cfg):
    """Default `out` (inside the run's timestamped Hydra directory): Ctrl-C prints one line
    with the command to continue; running it, or the first command with resume=true, ends
    with the archive an uninterrupted run writes."""
    settings = [
        "model=tiny-random",
        f"paths.cache_dir={cache_dir}",
        "progress=false",
        "batch_size=2",
        "max_new_tokens=64",
        "seed=5",
    ]
    cwd, n, err = _interrupted_dump(tmp_path, settings)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "continue with: python -m engine dump " in lines[0], err[-2000:]
    cmd = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "engine"] and any(a.startswith("resume=/") for a in cmd)
    # the printed command, run as printed, finishes it
    res = subprocess.run(
        [sys.executable, *cmd[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    done = next(cwd.glob("outputs/dump/*/logits.h5"))
    ref = dump_mod.run(dump_cfg(*settings[3:], f"n_samples={n}", f"out={tmp_path}/ref.h5"))[
        "archive"
    ]
    with Archive(done) as a, Archive(ref) as b:
        assert np.array_equal(a.samples()["tokens"], b.samples()["tokens"])
        assert np.array_equal(a.model().logits[()], b.model().logits[()])
    # the plain resume=true of the first command finds the newest partial with its settings
    done.unlink()
    rc, err = _ctrl_c_when(
        "outputs/dump/*/logits.h5.partial", cwd, ["dump", *settings, f"n_samples={n}"]
    )
    assert rc in (0, 130), err[-2000:]
    if rc == 130:  # (if it finished first, there is nothing to resume: the archive is whole)
        res = subprocess.run(
            [sys.executable, "-m", "engine", "dump", *settings, f"n_samples={n}", "resume=true"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert res.returncode == 0, res.stderr[-2000:]
    with Archive(next(cwd.glob("outputs/dump/*/logits.h5"))) as a, Archive(ref) as b:
        assert np.array_equal(a.model().logits[()], b.model().logits[()])


def test_interrupt_before_anything_is_written_says_so(dump_cfg, tmp_path, monkeypatch, capsys):
    from engine.cli import user_errors
    from engine.runtime import run as run_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "load_model", interrupted)
    with pytest.raises(SystemExit) as e, user_errors():
        dump_mod.run(dump_cfg("n_samples=1", f"out={tmp_path}/x.h5"))
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == "error: interrupted; nothing was written", err


@pytest.mark.parametrize(
    "verb, extra, needle",
    [
        ("score", ["archive=/nonexistent/a.h5"], "archive not found"),
        ("score", ["archive=/nonexistent/a.h5", "model=nope"], "unknown model 'nope'"),
        ("perturb", ["source=/nonexistent/a.h5", "model=tiny-random"], "archive not found"),
        ("perturb", ["model=tiny-random"], "source"),
    ],
)
def test_score_and_perturb_bad_input_get_one_line(tmp_path, cache_dir, verb, extra, needle):
    res = engine_cli(
        verb,
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path}/h",
        "progress=false",
        *extra,
    )
    assert_one_line_error(res, needle)
