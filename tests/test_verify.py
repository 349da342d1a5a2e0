"""Per-sample checksums and `python -m engine verify`: the writer's checksums are the xxh3_64
of the stored bytes of steps [0, length) (recomputed here from the raw bytes, nothing else);
a byte flipped in the file (logits, q16 scale, activations, a scored group, a shard under a
merged archive) is named by sample, group and dataset with exit status 1 while every other
sample verifies; padding is not covered; merge carries the checksums (by reference and
--copy) and --copy refuses a damaged shard; the self-check slot; one-line refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import xxhash

from engine import archive
from engine.archive import Archive, ModelInfo, Rows
from engine.archive import format as F
from engine.cli import parse_samples
from engine.commands import dump as dump_mod
from engine.commands import score as score_mod
from engine.commands.merge import merge
from engine.commands.verify import main as verify_main
from engine.commands.verify import verify
from engine.errors import EngineError
from tests.conftest import ROOT, compose_cfg, compose_dump, engine_cli

#: every per-sample dataset kind: q16 (scale, offset) and a captured hook
SETTINGS = [
    "model=tiny-random",
    "n_samples=3",
    "batch_size=2",
    "max_new_tokens=7",
    "codec=q16",
    "capture=[blocks.0.hook_resid_post]",
]
#: a scored group in another codec (fp16)
TEMPERED = [
    "model=tempered",
    "model.base=tiny-random",
    "model.gamma=1.7",
    "batch_size=2",
    "codec=fp16",
]
GEN, SCORED, HOOK = (
    "tiny-random",
    "tiny-random-tempered-1.7",
    "activations/blocks.0.hook_resid_post",
)
V4 = Path(__file__).parent / "data" / "v4-d9aa91f.h5"


def dump_and_score(tmp: Path, cache: Path, *extra: str) -> Path:
    path = Path(dump_mod.run(compose_dump(tmp, cache, [*SETTINGS, *extra]))["archive"])
    score_mod.run(compose_cfg("score", tmp, cache, [f"archive={path}", *TEMPERED]))
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory, cache_dir) -> Path:
    """A q16 dump with a captured hook (6 samples x 7 steps) and an fp16 scored group."""
    return dump_and_score(tmp_path_factory.mktemp("verify"), cache_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cache_dir) -> list[Path]:
    """The same run as 2 shards, each scored."""
    tmp = tmp_path_factory.mktemp("vshards")
    return [
        dump_and_score(tmp / f"shard{i}", cache_dir, f"shard={i}", "num_shards=2") for i in range(2)
    ]


def recomputed(path: Path, key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(columns, stored [sample, column], xxh3_64 of ds[i, :length].tobytes() [sample, column])
    with plain h5py: no project code, no floats."""
    with h5py.File(path, "r") as f:
        g, lengths = f["models"][key], f["samples/length"][()]
        cols = json.loads(g["checksums"].attrs["columns"])
        want = np.array(
            [
                [xxhash.xxh3_64_intdigest(g[c][i, : lengths[i]].tobytes()) for c in cols]
                for i in range(len(lengths))
            ],
            dtype=np.uint64,
        )
        return cols, g["checksums"][()], want


def flip(path: Path, dataset: str, sample: int, step: int = 0, col: int = 3, bit: int = 6) -> None:
    """Flip one bit of the file itself: in the last byte of element [sample, step, col] (or
    [sample, step] of a 2-d dataset) of `dataset`, located through HDF5's chunk index."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        index = (sample, step, col)[: ds.ndim]
        info = ds.id.get_chunk_info_by_coord(tuple(i - i % c for i, c in zip(index, ds.chunks)))
        within = np.ravel_multi_index(tuple(i % c for i, c in zip(index, ds.chunks)), ds.chunks)
        offset = info.byte_offset + (int(within) + 1) * ds.dtype.itemsize - 1
        before = ds[index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << bit)]))
    with h5py.File(path, "r") as f:  # that stored value, and only it, changed
        assert f[dataset][index] != before


def run_verify(capsys, *args) -> tuple[int, list[str], str]:
    """`python -m engine verify ARGS` in process: (exit status, stdout lines, stderr)."""
    try:
        rc = verify_main([*map(str, args), "--no-progress"])
    except SystemExit as exc:  # user errors: one line, status 2
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


# ---- what the writer stores -----------------------------------------------------------------
@pytest.mark.parametrize("key", [GEN, SCORED])
def test_checksums_are_the_xxh3_of_the_stored_bytes(scored, key):
    cols, stored, want = recomputed(scored, key)
    expect = ["logits", "logits_scale", "logits_offset", HOOK] if key == GEN else ["logits"]
    assert cols == expect
    assert stored.dtype == np.uint64 and stored.shape == (6, len(cols))
    np.testing.assert_array_equal(stored, want)
    assert len(set(stored[:, 0].tolist())) == 6  # distinct samples, distinct digests
    with h5py.File(scored, "r") as f:
        attrs = f["models"][key]["checksums"].attrs
        assert attrs["algorithm"] == "xxh3_64" and attrs["over"] == "steps [0, length)"
        assert int(f.attrs["format_version"]) == F.FORMAT_VERSION


def synthetic(path: Path, hashing: bool = True) -> tuple[np.ndarray, int]:
    """An archive written straight through the writer: 3 samples of lengths 9, 4, 0 of 11
    steps (padding after; the producer stops after step 8, as the sampling loop does once
    every sample has ended), q16 with an activation hook."""
    V, T, d, n = 258, 11, 6, 3
    rng = np.random.default_rng(0)
    info = ModelInfo(
        key="synth",
        provenance={"source": "synthetic"},
        vocab_size=V,
        prompt_text=["p"],
        prompt_tokens=[[1, 2]],
        vocab_strings=[""] * V,
        tokenizer_json="",
    )
    lengths = np.array([9, 4, 0])
    w = archive.create(
        path,
        run_key={"synthetic": 1},
        config_yaml="",
        provenance_root={},
        prompts=["p"],
        n_samples=n,
        max_new_tokens=T,
        model=info,
        codec="q16",
        window=24.0,
        capture_dims={"hook": d},
    )
    w.rows.hashing = hashing

    def steps():
        for t in range(int(lengths.max())):
            yield Rows(
                t=t,
                data=rng.integers(0, 65535, (n, V), dtype=np.uint16),
                tokens=np.full(n, 7),
                alive=t < lengths,
                scale=rng.random(n, dtype=np.float32),
                offset=-rng.random(n, dtype=np.float32),
                acts={"hook": rng.random((n, d), dtype=np.float32)},
            )

    with w:
        w.write_batch(0, [0, 1, 2], steps(), eos_ids=[999])
        w.finish()
    return lengths, T


def test_writer_hashes_steps_below_length_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "CHUNK_TARGET_BYTES", 5 * 258 * 2)  # at most 5 steps a chunk
    path = tmp_path / "s.h5"
    lengths, T = synthetic(path)
    with h5py.File(path, "r") as f:
        lg = f["models/synth/logits"]
        assert lg.chunks == (1, 4, 258)  # steps 0-3, 4-7, 8-10
        assert f["samples/length"][()].tolist() == lengths.tolist()
        for i, n in enumerate(lengths):  # the writer's padding is zeros, the last chunk's too
            assert (n == 0 or lg[i, :n].any()) and not lg[i, n:].any(), i
    cols, stored, want = recomputed(path, "synth")
    assert cols == ["logits", "logits_scale", "logits_offset", "activations/hook"]
    np.testing.assert_array_equal(stored, want)
    assert (stored[2] == xxhash.xxh3_64_intdigest(b"")).all()  # no steps: the empty digest
    with h5py.File(path, "r") as f:  # padding rows are not hashed (they would change it)
        assert stored[1, 0] != xxhash.xxh3_64_intdigest(f["models/synth/logits"][1].tobytes())
    assert verify(path, progress=False).ok
    flip(path, "models/synth/logits", 1, step=5)  # step 5 >= length 4: padding
    flip(path, "models/synth/logits_scale", 1, step=4)
    assert verify(path, progress=False).ok
    flip(path, "models/synth/logits", 1, step=3)  # step 3 < length 4
    assert [(m.sample, m.dataset) for m in verify(path, progress=False).mismatches] == [
        (1, "logits")
    ]


def test_hashing_off_leaves_zeros_and_verify_says_so(tmp_path):
    """The bench's switch really turns hashing off (so its timing compares something)."""
    path = tmp_path / "off.h5"
    synthetic(path, hashing=False)
    with h5py.File(path, "r") as f:
        assert not f["models/synth/checksums"][()].any()
    r = verify(path, progress=False)
    assert {m.sample for m in r.mismatches} == {0, 1, 2}


# ---- verify -----------------------------------------------------------------------------------
def test_a_clean_archive_verifies(scored, capsys):
    rc, out, err = run_verify(capsys, scored)
    assert rc == 0 and len(out) == 1 and out[0].startswith("ok: ") and "all match" in out[0], out
    assert "30 checksums of 6 samples" in out[0]  # 6 x (4 generator + 1 scored)
    rc, out, _ = run_verify(capsys, scored, "--samples", "1,3-4")
    assert rc == 0 and "15 checksums of 3 samples" in out[0]


@pytest.mark.parametrize(
    "key, dataset, sample",
    [
        (GEN, "logits", 4),
        (GEN, "logits_scale", 2),
        (GEN, "logits_offset", 0),
        (GEN, HOOK, 5),
        (SCORED, "logits", 1),
    ],
)
def test_one_flipped_byte_is_named_and_nothing_else(scored, tmp_path, capsys, key, dataset, sample):
    path = tmp_path / "damaged.h5"
    shutil.copy(scored, path)
    flip(path, f"models/{key}/{dataset}", sample)
    rc, out, _ = run_verify(capsys, path)
    assert rc == 1
    assert out[:-1] == [ln for ln in out if ln.startswith("MISMATCH")]
    assert len(out) == 2 and out[0].startswith(f"MISMATCH sample {sample} model {key} {dataset}: ")
    assert out[-1].startswith("DAMAGED: 1 of 30 checksums") and f"({sample})" in out[-1]
    others = ",".join(str(i) for i in range(6) if i != sample)
    assert run_verify(capsys, path, "--samples", others)[0] == 0  # every other sample verifies
    assert run_verify(capsys, path, "--samples", str(sample))[0] == 1


def test_bad_input_is_one_line_with_status_2(scored, tmp_path, capsys):
    partial = tmp_path / "p.h5.partial"
    shutil.copy(scored, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs.modify("complete", np.int8(0))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5" * 100)
    cases = [
        (tmp_path / "none.h5", "archive not found"),
        (tmp_path / "junk.h5", "cannot read"),
        (partial, "is incomplete"),
        (V4, "no checksums (format version 4)"),
    ]
    for path, needle in cases:
        rc, out, err = run_verify(capsys, path)
        assert rc == 2 and not out and err.count("\n") == 1 and needle in err, (path, err)
    for spec, needle in (
        ("6", "sample 6 out of range (0..5)"),
        ("a", "neither a sample index"),
        ("4-2", "runs backwards"),
    ):
        rc, _, err = run_verify(capsys, scored, "--samples", spec)
        assert rc == 2 and needle in err, err
    r = engine_cli("verify", str(V4))  # the real entry point: no traceback
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: no checksums (format version 4)"), r.stderr


def test_parse_samples():
    assert parse_samples("0,3,10-12,3", 20) == [0, 3, 10, 11, 12]
    assert parse_samples(" 2 ", 3) == [2]
    with pytest.raises(EngineError, match="out of range"):
        parse_samples("0-3", 3)


# ---- merge ----------------------------------------------------------------------------------
def test_merge_carries_the_checksums_and_the_merged_file_verifies(shards, tmp_path, capsys):
    virtual = merge(tmp_path / "virtual.h5", [str(s) for s in shards], progress=False)["archive"]
    copied = merge(tmp_path / "copied.h5", [str(s) for s in shards], copy=True, progress=False)[
        "archive"
    ]
    for key in (GEN, SCORED):
        parts = [recomputed(s, key)[1] for s in shards]
        for out in (virtual, copied):
            cols, stored, want = recomputed(Path(out), key)
            np.testing.assert_array_equal(stored, np.concatenate(parts))
            np.testing.assert_array_equal(stored, want)
    for out in (virtual, copied):
        rc, lines, _ = run_verify(capsys, out)
        assert rc == 0 and "all match" in lines[-1]
    # a byte flipped in shard 1 after the merge: the by-reference archive reads it through its
    # virtual datasets and names the run's sample; the copy is self-contained and unaffected
    with Archive(shards[1]) as a:
        start = a.shard.start
    flip(shards[1], f"models/{GEN}/logits", 1)
    try:
        rc, lines, _ = run_verify(capsys, virtual)
        assert rc == 1 and lines[0].startswith(f"MISMATCH sample {start + 1} model {GEN} logits:")
        assert len(lines) == 2
        assert run_verify(capsys, copied)[0] == 0
        # ... and a copy from the damaged shard is refused with one line, leaving nothing
        out = tmp_path / "refused.h5"
        with pytest.raises(
            EngineError,
            match=f"sample 1 \\(sample {start + 1} of the run\\) of "
            f"model '{GEN}' does not match its checksum",
        ):
            merge(out, [str(s) for s in shards], copy=True, progress=False)
        assert not out.exists() and not Path(f"{out}.partial").exists()
        r = engine_cli("merge", "--copy", "--no-progress", str(out), *map(str, shards))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "damaged" in r.stderr
        assert not out.exists() and not Path(f"{out}.partial").exists()
    finally:
        flip(shards[1], f"models/{GEN}/logits", 1)  # undo: the same bit again
    assert verify(virtual, progress=False).ok


# ---- the self-check slot ------------------------------------------------------------------
def test_self_check_slot_is_fixed_size_rewritten_in_place(tmp_path):
    path = tmp_path / "s.h5"
    synthetic(path)
    with Archive(path) as a:
        assert a.model().self_check is None  # NaN until recorded
    with h5py.File(path, "r") as f:
        slot = f["models/synth"].attrs[F.SELF_CHECK]
        assert slot.dtype == np.float64 and slot.shape == (4,) and np.isnan(slot).all()
    with h5py.File(path, "r+") as f:
        mw = archive.ModelWriter(f["models/synth"])
        mw.record_self_check(sample=1, steps=4, max_abs_diff=2.5e-5, bound=1e-3)
        mw.record_self_check(sample=0, steps=11, max_abs_diff=3e-5, bound=1e-3)  # rewritten
        assert f["models/synth"].attrs[F.SELF_CHECK].shape == (4,)
    with Archive(path) as a:
        assert a.model().self_check == {
            "sample": 0,
            "steps": 11,
            "max_abs_diff": 3e-5,
            "bound": 1e-3,
        }
        assert "self_check" not in a.model().provenance
    with Archive(V4) as a:  # before version 5: no slot, no checksums
        assert all(m.self_check is None and m.checksum_columns is None for m in a.models.values())


def test_merged_self_check_is_the_first_shards_with_the_runs_sample(shards, tmp_path):
    """The first shard that recorded a check gives the merged group's (shard 0's is the single
    run's own), its sample index made the run's; merged_from keeps every shard's."""

    def merged(checks: list) -> tuple[dict | None, list]:
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        copies = []
        for i, (s, check) in enumerate(zip(shards, checks)):
            (d / f"s{i}").mkdir(parents=True)
            copies.append(d / f"s{i}" / s.name)
            shutil.copy(s, copies[-1])
            with h5py.File(copies[-1], "r+") as f:
                for key in (GEN, SCORED):
                    f[f"models/{key}"].attrs.modify(F.SELF_CHECK, np.full(4, np.nan))
                if check is not None:
                    archive.ModelWriter(f[f"models/{GEN}"]).record_self_check(*check)
        out = merge(d / "m.h5", [str(c) for c in copies], progress=False)["archive"]
        with Archive(out) as a:
            assert a.model(SCORED).self_check is None
            return a.model().self_check, [r["self_checks"][GEN] for r in a.merged_from]

    with Archive(shards[1]) as a:
        start = a.shard.start
    check, records = merged([None, (1, 7, 4e-5, 1e-3)])
    assert check == {"sample": start + 1, "steps": 7, "max_abs_diff": 4e-5, "bound": 1e-3}
    assert records == [None, {"sample": 1, "steps": 7, "max_abs_diff": 4e-5, "bound": 1e-3}]
    check, _ = merged([(2, 5, 1e-5, 2e-3), (1, 7, 4e-5, 1e-3)])
    assert check == {"sample": 2, "steps": 5, "max_abs_diff": 1e-5, "bound": 2e-3}
    assert merged([None, None])[0] is None


def test_verify_bench_stays_runnable(tmp_path):
    """bench/verify.py at toy size: writes with and without hashing, reads, verifies, cleans up."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.verify",
            "--prompts",
            "2",
            "--per-prompt",
            "3",
            "--steps",
            "8",
            "--vocab",
            "512",
            "--writer-batches",
            "1",
            "--rounds",
            "1",
            "--synced-rounds",
            "1",
            "--dir",
            str(tmp_path / "v"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for line in (
        "writer into the page cache",
        "writer, whole archive, synced",
        "sequential read, cold",
        "verify, cold: 12 checksums",
        "verify, warm",
    ):
        assert line in r.stdout, r.stdout
    assert r.stdout.count("on/off = ") == 2 and not (tmp_path / "v").exists()


def test_an_unreadable_sample_is_reported_and_the_rest_verified(scored, capsys, monkeypatch):
    """A read error inside the file (a damaged chunk index raises OSError from h5py) is one
    UNREADABLE line for that sample, counted as damage (exit 1), not a traceback."""
    real = Archive.iter_rows

    def failing(self, key, samples=None, **kw):
        for block in real(self, key, samples=samples, **kw):
            if block.sample == 3 and key == GEN:
                raise OSError("Can't read data (wrong B-tree signature)")
            yield block

    monkeypatch.setattr(Archive, "iter_rows", failing)
    rc, out, _ = run_verify(capsys, scored)
    assert rc == 1
    bad = [line for line in out if line.startswith(("UNREADABLE", "MISMATCH"))]
    assert bad == [
        f"UNREADABLE sample 3 model {GEN} (unreadable: Can't read data (wrong B-tree signature))"
    ], out
    assert "DAMAGED" in out[-1]
