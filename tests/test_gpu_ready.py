"""What GPU runs rely on, tested where it can be on the CPU: non-finite logits, device-free
random draws, dtypes and their provenance, one host sync per step, the writer thread, and the
tests' own device."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from engine.archive import Archive
from engine.archive import format as F
from engine.commands import dump
from engine.errors import EngineError
from engine.runtime import run as R
from engine.runtime.models import load_model
from engine.runtime.sampling import LOGITS_HOOK
from engine.runtime.settings import ModelSpec
from tests.conftest import DEVICE, ROOT


def prompt_file(tmp_path: Path, *texts: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(texts) + "\n")
    return f"prompts.file={path}"


def poison(lm, row: int, step: int):
    """NaN into one logit of batch row `row` at generation step `step` (forward call step+1:
    the prompt's forward gives step 0)."""
    calls = {"n": 0}

    def hook(logits, hook):
        calls["n"] += 1
        if calls["n"] == step + 1:
            logits = logits.clone()
            logits[row, -1, 3] = float("nan")
        return logits

    lm.bridge.add_hook(LOGITS_HOOK, hook, is_permanent=True)
    return calls


# ---- non-finite logits ------------------------------------------------------------------------
def test_nonfinite_logits_fail_with_one_line_naming_sample_step_and_model(dump_cfg, tmp_path):
    cfg = dump_cfg(
        "n_samples=4",
        "batch_size=4",
        "max_new_tokens=6",
        prompt_file(tmp_path, "Hi"),
        f"out={tmp_path}/nan.h5",
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    poison(lm, row=1, step=2)
    with pytest.raises(EngineError) as e:
        dump.run(cfg, model=lm)
    msg = str(e.value)
    assert "\n" not in msg and "tiny-random" in msg and "sample 1, step 2" in msg, msg
    assert not (tmp_path / "nan.h5").exists()  # nothing final written ...
    with h5py.File(tmp_path / "nan.h5.partial") as f:  # ... and nothing of the batch committed
        assert int(f.attrs["n_complete"]) == 0


def test_nonfinite_logits_recorded_end_that_sample_only(dump_cfg, tmp_path):
    common = (
        "n_samples=4",
        "batch_size=4",
        "max_new_tokens=6",
        "codec=fp32",
        prompt_file(tmp_path, "Hi"),
    )
    clean = dump.run(dump_cfg(*common, f"out={tmp_path}/clean.h5"))["archive"]
    cfg = dump_cfg(*common, "on_nonfinite=record", f"out={tmp_path}/rec.h5")
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    poison(lm, row=1, step=2)
    rec = dump.run(cfg, model=lm)["archive"]
    with Archive(clean) as a, Archive(rec) as b:
        sa, sb = a.samples(), b.samples()
        assert b.complete
        assert int(sb["finish_reason"][1]) == F.FINISH_REASONS["nonfinite"]
        assert int(sb["length"][1]) == 2  # step 2 is not stored
        assert np.array_equal(sb["tokens"][1, :2], sa["tokens"][1, :2])
        for i in (0, 2, 3):  # the other rows of the batch are untouched
            assert np.array_equal(sb["tokens"][i], sa["tokens"][i])
            assert int(sb["finish_reason"][i]) == int(sa["finish_reason"][i])
            np.testing.assert_array_equal(b.model().rows(i), a.model().rows(i))
        assert np.isfinite(b.model().rows(1)).all()


# ---- device-independent draws -------------------------------------------------------------------
def test_draws_are_cpu_side_and_reproduce_from_stored_logits(dump_cfg, tmp_path, monkeypatch):
    """Every generator is a CPU one (CUDA's Philox would give other numbers from the same
    seed), and each token follows from the stored logits and the sample's seed alone: the
    same inverse-CDF draw, recomputed here from the fp32 archive, gives every stored token."""
    import engine.runtime.sampling as S

    made = []
    real = torch.Generator

    class Spy(real):  # the model's device must not reach the generators
        def __init__(self, *args, **kw):
            made.append(kw.get("device", args[0] if args else None))
            super().__init__(*args, **kw)

    monkeypatch.setattr(S.torch, "Generator", Spy)
    cfg = dump_cfg(
        "n_samples=3", "batch_size=2", "max_new_tokens=6", "codec=fp32", f"out={tmp_path}/d.h5"
    )
    path = dump.run(cfg)["archive"]
    monkeypatch.setattr(S.torch, "Generator", real)
    assert made and all(d is None for d in made), made  # default: the CPU's MT19937
    with Archive(path) as a:
        s, m = a.samples(), a.model()
        for i in range(a.n_samples):
            g = torch.Generator().manual_seed(int(s["seed"][i]))
            for t in range(int(s["length"][i])):
                x = torch.from_numpy(m.rows(i, slice(t, t + 1)))
                u = torch.rand(1, generator=g, dtype=torch.float64)
                assert int(S.draw(x, u)[0]) == int(s["tokens"][i, t]), (i, t)


# ---- dtypes -----------------------------------------------------------------------------------
def test_bf16_model_dtype_is_what_runs_and_what_provenance_says(dump_cfg, tmp_path):
    cfg = dump_cfg(
        "model.dtype=bfloat16", "n_samples=2", "max_new_tokens=5", f"out={tmp_path}/bf.h5"
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    assert {p.dtype for p in lm.bridge.parameters()} == {torch.bfloat16}
    assert lm.bridge.cfg.dtype == torch.bfloat16  # the bridge was told (it said float32)
    path = dump.run(cfg, model=lm)["archive"]  # end to end on the CPU
    with Archive(path) as a:
        m = a.model()
        assert m.provenance["dtype"] == "bfloat16" and m.provenance["device"] == lm.device.type
        rows = m.rows(0)
        assert np.isfinite(rows).all()
        # bf16 logits upcast to float32 before fp16 encoding: every stored value is a bf16 value
        as_bf16 = torch.from_numpy(rows.astype(np.float32)).bfloat16().float().numpy()
        np.testing.assert_array_equal(rows.astype(np.float32), as_bf16)


def test_dtype_auto_resolves_by_device():
    from engine.runtime.models import resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(EngineError, match="auto, float32"):
        resolve_dtype("half")


def test_tempered_twin_multiplies_in_float32(dump_cfg, monkeypatch):
    """A bf16 base's tempered twin: gamma * logits in float32, not rounded to bf16."""
    from engine.runtime import models
    from engine.runtime.sampling import forward_logits

    base_spec = ModelSpec.from_node(dump_cfg("model.dtype=bfloat16").model)
    monkeypatch.setattr(models, "model_config", lambda name: base_spec)
    tw = load_model(
        ModelSpec.from_node(dump_cfg("model=tempered", "model.gamma=1.37").model), DEVICE
    )
    base = load_model(base_spec, DEVICE)
    ids = torch.tensor([[0, 40, 41, 42]], device=tw.device)
    got = forward_logits(tw.bridge, ids)
    want = forward_logits(base.bridge, ids).float() * 1.37
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gguf_cache_is_float32_whatever_dtype_loads_first(tmp_path, monkeypatch):
    """The dequantization cache was keyed by the file alone and written in the first load's
    dtype, so a bf16 first load left bf16-rounded weights for every later float32 run."""
    import dataclasses

    from engine.runtime import models
    from engine.runtime.settings import model_config

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    asked = []

    def fake_load(name_or_dir, revision, dtype, gguf_file=None, device_map=None):
        if gguf_file:  # the dequantization itself
            asked.append(dtype)
            return models.tiny_random_model(0, dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return (
            AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype).eval(),
            AutoTokenizer.from_pretrained(name_or_dir),
        )

    monkeypatch.setattr(models, "_load_hf", fake_load)
    spec = dataclasses.replace(model_config("gguf"), path=str(gguf), dtype="bfloat16")
    m16, _, p16 = models.load_hf_source(spec, tmp_path / "cache")
    spec = dataclasses.replace(spec, dtype="float32")
    m32, _, p32 = models.load_hf_source(spec, tmp_path / "cache")
    assert asked == [torch.float32]  # dequantized once, in float32
    assert p16["dtype"] == "bfloat16" and p32["dtype"] == "float32"
    ref, _ = models.tiny_random_model(0, torch.float32)
    for (k, v), w in zip(
        sorted(m32.state_dict().items()), [ref.state_dict()[k] for k in sorted(ref.state_dict())]
    ):
        assert torch.equal(v, w), k  # float32 weights exact, not bf16-rounded
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        f"m-{p32['weights_sha256'][:16]}-float32"
    ]


# ---- host syncs, the writer thread ------------------------------------------------------------
def test_one_host_sync_per_step(dump_cfg, tmp_path, monkeypatch):
    """Calls that wait for the device (.cpu, .item, .tolist, bool) made by the sampling
    thread while it samples: one per step (the tokens and non-finite flags, together)."""
    main = threading.get_ident()
    count = {"n": 0, "on": False}
    for name in ("cpu", "item", "tolist", "__bool__"):  # .numpy() needs a host tensor: no sync
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, **kw):
            if count["on"] and threading.get_ident() == main:
                count["n"] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    cfg = dump_cfg(
        "n_samples=4",
        "batch_size=2",
        "max_new_tokens=8",
        "q16_window=24",
        "codec=q16",
        f"out={tmp_path}/s.h5",
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    real_sample_all = R.sample_all

    def counted(*a, **kw):
        count["on"] = True
        try:
            return real_sample_all(*a, **kw)
        finally:
            count["on"] = False

    monkeypatch.setattr(R, "sample_all", counted)
    monkeypatch.setattr(dump.R, "sample_all", counted)
    real_check, checks = R.self_check, []

    def uncounted(*a, **kw):  # the run's one teacher-forced self-check is not a decode step
        count["on"] = False
        try:
            checks.append(real_check(*a, **kw))
            return checks[-1]
        finally:
            count["on"] = True

    monkeypatch.setattr(R, "self_check", uncounted)
    path = dump.run(cfg, model=lm)["archive"]
    with Archive(path) as a:
        steps = sum(int(a.samples()["length"][s0 : s0 + 2].max()) for s0 in range(0, 8, 2))
    assert count["n"] <= steps, (count["n"], steps)
    assert len(checks) == 1 and checks[0] is not None  # ... and it did run, once


def test_writer_thread_leaves_the_archive_unchanged(dump_cfg, tmp_path):
    common = (
        "n_samples=3",
        "batch_size=2",
        "max_new_tokens=7",
        "codec=q16",
        "capture=[blocks.0.hook_resid_post]",
    )
    a = dump.run(dump_cfg(*common, "write_thread=true", f"out={tmp_path}/t.h5"))["archive"]
    b = dump.run(dump_cfg(*common, "write_thread=false", f"out={tmp_path}/s.h5"))["archive"]
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names = []
        fa.visit(lambda n: names.append(n) if isinstance(fa[n], h5py.Dataset) else None)
        assert len(names) > 10
        for n in names:
            x, y = fa[n][()], fb[n][()]
            if getattr(x, "dtype", None) == np.dtype(object):  # vlen rows: compare each
                assert all(np.array_equal(u, v) for u, v in zip(x, y)), n
            else:
                assert np.array_equal(x, y), n


def test_out_of_memory_names_a_batch_size_that_fits(dump_cfg, tmp_path, monkeypatch):
    cfg = dump_cfg("n_samples=4", "batch_size=4", "max_new_tokens=3", f"out={tmp_path}/o.h5")

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.70 GiB")
        yield  # pragma: no cover

    monkeypatch.setattr(R, "generate", oom)
    with pytest.raises(EngineError, match=r"batch of 4 rows does not fit.*batch_size=2"):
        dump.run(cfg)


def test_batch_size_auto_by_device(dump_cfg, tmp_path):
    cfg = dump_cfg("n_samples=2", "max_new_tokens=2", f"out={tmp_path}/a.h5")
    assert cfg.batch_size == "auto"
    dump.run(cfg)
    with Archive(tmp_path / "a.h5") as a:
        assert a.run_key["batch_size"] == R.AUTO_BATCH[a.run_key["device"]]


# ---- the tests' own device --------------------------------------------------------------------
def test_no_test_pins_the_cpu():
    """On a GPU machine `make test` must run the model on the GPU (tests/conftest.py DEVICE,
    LOGIT_ENGINE_TEST_DEVICE to override), not compare CPU results with CPU references."""
    pinned = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""load_model\([^)]*["']cpu["']|["']device=cpu["']""", line):
                pinned.append(f"{path.name}:{i}")
    assert not pinned, pinned


def test_analyses_skip_and_count_nonfinite_rows(tiny_archive, tmp_path):
    """A stored row of NaN logits (another writer's file) is left out of the means and
    counted, not averaged into NaN."""
    import shutil

    from analyses.__main__ import run as run_analysis
    from tests.test_analyses import analysis_cfg

    path = tmp_path / "nan.h5"
    shutil.copy(tiny_archive, path)
    with h5py.File(path, "r+") as f:
        g = f["models"][f.attrs["generator"]]["logits"]
        row = g[1, 2]
        row[5] = np.nan
        g[1, 2] = row
    s = run_analysis(analysis_cfg(tmp_path, "analysis=entropy", f"archive={path}"))
    m = next(iter(s["models"].values()))
    assert m["skipped_nonfinite_rows"] == 1
    assert np.isfinite(m["entropy_nats"]["mean"])
    with Archive(path) as a:
        assert m["n_steps"] == int(a.samples()["length"].sum()) - 1


def test_gpu_bench_runs_where_there_is_no_gpu():
    """bench/gpu.py stays runnable on the CPU (tiny sizes): one host sync per step."""
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--model",
            "tiny-random",
            "--n-samples",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--kernel-rows",
            "4",
            "--device",
            DEVICE,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "host syncs per step (sampling thread): 1.00" in r.stdout, r.stdout
    assert "fit_gamma fp32" in r.stdout


def test_score_refuses_nonfinite_logits_with_one_line(dump_cfg, tmp_path):
    from engine.commands import score
    from tests.conftest import compose_cfg

    path = dump.run(
        dump_cfg(
            "n_samples=2",
            "batch_size=2",
            "max_new_tokens=5",
            prompt_file(tmp_path, "Hi"),
            f"out={tmp_path}/s.h5",
        )
    )["archive"]
    cfg = compose_cfg(
        "score",
        tmp_path,
        tmp_path / "cache",
        ["model=tiny-random", "model.key=other", f"archive={path}"],
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    lm.key = "other"

    def hook(logits, hook):  # the teacher-forced forward: [batch, positions, vocab]
        logits = logits.clone()
        logits[1, 2, 7] = float("inf")
        return logits

    lm.bridge.add_hook(LOGITS_HOOK, hook, is_permanent=True)
    with pytest.raises(EngineError) as e:
        score.run(cfg, model=lm)
    assert "\n" not in str(e.value) and "other at sample 1, step 2" in str(e.value), e.value
    with Archive(path) as a:
        assert a.models["other"].n_complete == 0  # nothing of the batch committed
