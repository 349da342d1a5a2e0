"""Streaming kernels over archives equals decoding everything and calling the reference."""

import numpy as np
import pytest

import kernels as K
from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.stream import map_rows
from kernels import reference as R


@pytest.mark.parametrize("codec", ["fp16", "bf16", "q16"])
def test_map_rows_entropy_and_token_stats(dump_cfg, tmp_path, codec):
    res = dump_mod.run(
        dump_cfg(
            "n_samples=3",
            "batch_size=2",
            "max_new_tokens=9",
            f"codec={codec}",
            f"out={tmp_path}/{codec}.h5",
        )
    )
    with Archive(res["archive"]) as a:
        out, sample, step = map_rows(a, K.entropy, progress=False)
        s, m = a.samples(), a.model()
        assert len(out["value"]) == int(s["length"].sum())
        for i in range(a.n_samples):
            sel = sample == i
            ref = R.entropy(m.rows(i, slice(0, int(s["length"][i]))).astype(np.float64))
            np.testing.assert_allclose(out["value"][sel], ref, atol=2e-6)
            assert step[sel].tolist() == list(range(int(s["length"][i])))
        ts, sample, step = map_rows(a, K.token_stats, with_tokens=True, progress=False)
        i = a.n_samples - 1
        sel = sample == i
        lp, rank = R.token_stats(
            m.rows(i, slice(0, int(s["length"][i]))).astype(np.float64),
            s["tokens"][i, : int(s["length"][i])],
        )
        np.testing.assert_allclose(ts["logprob"][sel], lp, atol=3e-5)
        assert np.array_equal(ts["rank"][sel], rank)


def test_map_rows_reads_whole_chunks(tiny_archive, monkeypatch):
    """Every read is one chunk-aligned [sample, t0:t0+k] slab (no row-by-row reads)."""
    with Archive(tiny_archive) as a:
        k = a.model().logits.chunks[1]
        seen = []
        real = Archive.iter_rows

        def spy(self, *args, **kw):
            for b in real(self, *args, **kw):
                seen.append((int(b.steps[0]), len(b.steps)))
                yield b

        monkeypatch.setattr(Archive, "iter_rows", spy)
        map_rows(a, K.entropy, progress=False)
    assert all(t0 % k == 0 and n <= k for t0, n in seen)


def test_map_pairs_pairs_groups_stored_with_different_steps_per_chunk(
    dump_cfg, tmp_path, cache_dir, monkeypatch
):
    """A model scored with codec=fp32 on an fp16 archive stores half as many steps per chunk
    (at V = 49152: 10 against 16).  Planted here with a small chunk target (fp16: 6 steps,
    fp32: 3 steps per chunk); map_pairs must pair the same (sample, step) rows, and the pair
    analysis must run."""
    import json

    from analyses.__main__ import run as run_analysis
    from engine.archive import format as F
    from engine.commands import score as score_mod
    from engine.stream import map_pairs
    from tests.conftest import compose_cfg

    monkeypatch.setattr(F, "CHUNK_TARGET_BYTES", 258 * 4 * 3)
    res = dump_mod.run(
        dump_cfg("n_samples=2", "max_new_tokens=14", "codec=fp16", f"out={tmp_path}/mixed.h5")
    )
    score_mod.run(
        compose_cfg(
            "score",
            tmp_path,
            cache_dir,
            [
                f"archive={res['archive']}",
                "model=tempered",
                "model.base=tiny-random",
                "model.gamma=1.3",
                "codec=fp32",
            ],
        )
    )
    key = "tiny-random-tempered-1.3"
    with Archive(res["archive"]) as a:
        assert a.model().chunk_steps == 5 and a.model(key).chunk_steps == 3  # 14 steps evened out
        out, sample, step = map_pairs(
            a, lambda p, q, t: K.pair_stats(p, q, t), "tiny-random", key, progress=False
        )
        s = a.samples()
        assert len(sample) == int(s["length"].sum())
        for i in range(a.n_samples):
            n = int(s["length"][i])
            p, q = a.model().rows(i, slice(0, n)), a.model(key).rows(i, slice(0, n))
            sel = sample == i
            assert step[sel].tolist() == list(range(n))
            np.testing.assert_allclose(
                out["kl_pq"][sel],
                R.pair_stats(p.astype(np.float64), q.astype(np.float64))[0],
                atol=1e-5,
            )
    cfg = compose_cfg(
        "analyses", tmp_path / "pair", cache_dir, ["analysis=pair", f"archive={res['archive']}"]
    )
    summary = run_analysis(cfg)
    assert json.loads((tmp_path / "pair" / "summary.json").read_text())["aligned"] == key
    assert summary["aligned"] == key


@pytest.fixture
def gzip_archive(tiny_archive, tmp_path):
    """A copy of the tiny archive with gzip-compressed logits."""
    import h5py

    packed = tmp_path / "gzip.h5"
    with h5py.File(tiny_archive, "r") as src, h5py.File(packed, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            src.copy(src[name], dst, name)
        g = dst["models/tiny-random"]
        data, attrs = g["logits"][()], dict(g["logits"].attrs)
        del g["logits"]
        ds = g.create_dataset(
            "logits", data=data, chunks=src["models/tiny-random/logits"].chunks, compression="gzip"
        )
        for k, v in attrs.items():
            ds.attrs[k] = v
    return packed


def test_compressed_logits_read_alike_through_the_chunk_cache(tiny_archive, gzip_archive):
    """Readers MUST accept any filter: a gzip copy of an archive streams the same rows, and
    it is the one case that opens with a chunk cache (uncompressed logits are read straight
    into the caller's arrays)."""
    from engine.archive import reader

    with Archive(tiny_archive) as a, Archive(gzip_archive) as b:
        assert a.f.id.get_access_plist().get_cache()[2] == 0
        assert b.f.id.get_access_plist().get_cache()[2] == reader.FILTERED_CACHE
        got = [(x.sample, x.steps.tolist(), x.raw.tobytes()) for x in b.iter_rows()]
        assert got == [(x.sample, x.steps.tolist(), x.raw.tobytes()) for x in a.iter_rows()]


def test_iter_rows_asks_for_the_next_chunks_ahead(gzip_archive, monkeypatch):
    """Compressed chunks (read through HDF5): before block j is read, blocks
    j..j+READAHEAD_BLOCKS have been handed to the readahead; by the end, the helper thread has
    advised the OS of every chunk (posix_fadvise WILLNEED at the chunk's own byte range)."""
    import os

    from engine.archive import reader

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    from engine.archive import chunks

    advised, spans = [], []
    monkeypatch.setattr(
        chunks.os, "posix_fadvise", lambda fd, off, n, advice: advised.append((off, n, advice))
    )
    real_call = reader.Readahead.__call__
    monkeypatch.setattr(
        reader.Readahead,
        "__call__",
        lambda self, *span: (spans.append(span), real_call(self, *span))[1],
    )
    with Archive(gzip_archive) as a:
        ds, want = a.model().logits, []
        blocks = list(a.iter_rows())
        for j, b in enumerate(a.iter_rows()):
            n_before = len(spans)
            assert n_before >= len(blocks) + min(j + 1 + reader.READAHEAD_BLOCKS, len(blocks))
            info = ds.id.get_chunk_info_by_coord((b.sample, int(b.steps[0]), 0))
            want.append((info.byte_offset, info.size, os.POSIX_FADV_WILLNEED))
    assert sorted(want) == sorted(advised[len(advised) // 2 :])  # the second pass's advice


@pytest.mark.parametrize("codec", ["fp16", "fp32", "bf16", "q16"])
def test_streamed_blocks_are_views_of_the_files_pages_equal_to_hdf5_reads(
    dump_cfg, tmp_path, codec, monkeypatch
):
    """Uncompressed chunks stream as zero-copy views of the file (chunks.Mapped), byte for
    byte what HDF5 reads at the same place, blocks of a chunk's middle included, also when
    held after their pages were released (MADV_DONTNEED: they are paged in again); a block
    across two chunks falls back to HDF5."""
    import mmap

    from engine.archive import chunks
    from engine.archive import format as F
    from engine.archive.chunks import Mapped

    monkeypatch.setattr(F, "CHUNK_TARGET_BYTES", 258 * 4 * 3)  # several chunks per sample
    monkeypatch.setattr(chunks, "RELEASE_BYTES", mmap.PAGESIZE)  # release after every page
    res = dump_mod.run(
        dump_cfg("n_samples=2", "max_new_tokens=11", f"codec={codec}", f"out={tmp_path}/{codec}.h5")
    )
    with Archive(res["archive"]) as a:
        m = a.model()
        k = m.chunk_steps
        assert k < 11
        n = 0
        for b in list(a.iter_rows()):  # all held, most of them released by now
            owner = b.raw
            while isinstance(owner, np.ndarray):
                owner = owner.base
            owner = owner.obj if isinstance(owner, memoryview) else owner
            assert isinstance(owner, mmap.mmap), "not a view of the file"
            np.testing.assert_array_equal(b.raw, m.logits[b.sample, b.steps[0] : b.steps[-1] + 1])
            n += len(b.steps)
        assert n == int(a.samples()["length"].sum())
        mapped = Mapped(m.logits, k)
        try:
            np.testing.assert_array_equal(mapped.rows(1, 1, k), m.logits[1, 1:k])
            assert mapped.rows(1, k - 1, k + 1) is None  # two chunks: HDF5 reads it
        finally:
            mapped.close()
