"""Streaming kernels over archives equals decoding everything and calling the reference."""

import numpy as np
import pytest

import kernels as K
from engine import dump as dump_mod
from engine.reader import Archive
from engine.stream import map_rows
from kernels import reference as R


@pytest.mark.parametrize("codec", ["fp16", "bf16", "q16"])
def test_map_rows_entropy_and_token_stats(dump_cfg, tmp_path, codec):
    res = dump_mod.run(dump_cfg("n_samples=3", "batch_size=2", "max_new_tokens=9",
                                f"codec={codec}", f"out={tmp_path}/{codec}.h5"))
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
        lp, rank = R.token_stats(m.rows(i, slice(0, int(s["length"][i]))).astype(np.float64),
                                 s["tokens"][i, : int(s["length"][i])])
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
