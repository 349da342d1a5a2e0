"""The logit lens (`lens=true` on dump, score and perturb; `python -m engine layers`), against
planted truths: a float64 recomputation from captured residuals, a tempered twin (which
changes only the final logits), and a model whose last blocks are switched off."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels as K
import kernels.reference as REF
from engine.archive import Archive
from engine.archive import format as F
from engine.commands import dump, layers, perturb, score
from engine.commands.inspect import summary
from engine.commands.verify import verify
from engine.errors import EngineError
from engine.runtime import lens as lenses
from engine.runtime.models import resolve_device, tiny_random_model, wrap
from kernels.lens import lens_stats
from tests.conftest import DEVICE, compose_cfg, compose_dump

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
TEMPERED = ["model=tempered", "model.base=tiny-random", "model.gamma=1.7"]


@pytest.fixture(scope="module")
def lensed(tmp_path_factory, cache_dir) -> Path:
    """tiny-random (2 blocks) dumped with lens=true and both blocks' residuals captured, then
    scored by its tempered twin (gamma 1.7) with lens=true; fp32 rows."""
    tmp = tmp_path_factory.mktemp("lens")
    cfg = compose_dump(
        tmp,
        cache_dir,
        [
            "model=tiny-random",
            "n_samples=3",
            "batch_size=2",
            "max_new_tokens=10",
            "codec=fp32",
            "lens=true",
            "lens_topk=4",
            f"capture=[{','.join(HOOKS)}]",
        ],
    )
    path = dump.run(cfg)["archive"]
    score.run(
        compose_cfg(
            "score", tmp, cache_dir, [f"archive={path}", *TEMPERED, "lens=true", "lens_topk=4"]
        )
    )
    return Path(path)


def valid(a: Archive):
    """[sample, step] mask of stored steps."""
    length = a.samples()["length"]
    return np.arange(a.max_new_tokens)[None, :] < length[:, None]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_lens_stats_kernel_matches_float64_reference(backend):
    rng = np.random.default_rng(3)
    L, n, V, k = 4, 6, 200, 5
    lens = (rng.normal(size=(L, n, V)) * 3).astype(np.float32)
    final = (rng.normal(size=(n, V)) * 3).astype(np.float32)
    lens[-1] = final  # the last block's lens is the model's output
    tok = rng.integers(0, V, n)
    args = (
        (final, lens, tok) if backend == "numpy" else tuple(map(torch.tensor, (final, lens, tok)))
    )
    got = lens_stats(*args, k)
    want = REF.lens_stats(final, lens, tok, k)
    for name, g, w in zip(got._fields, got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)
    assert np.all(np.asarray(got.kl_final)[:, -1] == 0) and np.all(
        np.asarray(got.rank_final_top)[:, -1] == 1
    )


def test_dump_lens_equals_float64_recomputation_from_captured_residuals(lensed, cache_dir):
    """Every stored statistic against numpy float64: RMSNorm and unembedding written out from
    the model's weights, applied to the residuals the same run captured."""
    from engine.runtime.models import load_model
    from engine.runtime.settings import ModelSpec

    lm = load_model(
        ModelSpec(
            source="tiny-random", name="tiny-random-llama", key="tiny-random", dtype="float32"
        ),
        DEVICE,
        cache_dir,
    )
    norm = lm.bridge.ln_final.original_component
    w = norm.weight.detach().cpu().double().numpy()
    eps = float(norm.variance_epsilon)
    W = lm.bridge.unembed.original_component.weight.detach().cpu().double().numpy()  # [vocab, d]
    with Archive(lensed) as a:
        m, ok = a.model(), valid(a)
        lens = m.lens
        assert lens.layers.tolist() == [0, 1] and lens.n_layers == 2 and lens.k == 4
        assert lens.convention == "resid_post"
        assert lens.check is not None and lens.check["max_abs_diff"] <= lens.check["bound"] < 1e-3
        tokens = a.samples()["tokens"]
        n_checked = 0
        for i, t in zip(*np.nonzero(ok)):
            x = np.stack([m.group["activations"][h][i, t] for h in HOOKS]).astype(np.float64)
            xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w
            raw = xn @ W.T  # [layer, vocab]
            final = m.rows(i, slice(t, t + 1))[0].astype(np.float64)
            raw[-1] = final  # the last block's row is the model's own output
            want = REF.lens_stats(final[None], raw[:, None], [tokens[i, t]], 4)
            for name, wv in zip(
                ("entropy", "kl_final", "logp_token", "rank_final_top", "topk_ids", "topk_logp"),
                want,
            ):
                np.testing.assert_allclose(
                    lens[name][i, t], wv[0], atol=2e-4, rtol=1e-4, err_msg=f"{name} {i} {t}"
                )
            n_checked += 1
        assert n_checked == ok.sum() > 10
        assert np.all(lens["kl_final"][:, :, -1][ok] == 0)
        assert np.all(
            lens["kl_final"][:, :, 0][ok] > 1e-3
        )  # the first block's lens is not the output
        assert np.all(lens["entropy"][:][~ok] == 0)  # padding
    assert verify(lensed, progress=False).ok  # the lens datasets are checksummed


def test_tempered_twin_lens_is_its_base_below_the_last_block(lensed):
    """The twin multiplies only the final logits: at block 0 its lens is the base model's."""
    with Archive(lensed) as a:
        ok = valid(a)
        base, twin = a.model().lens, a.model("tiny-random-tempered-1.7").lens
        assert twin.check["max_abs_diff"] <= twin.check["bound"]
        for name in ("entropy", "logp_token", "topk_ids", "topk_logp"):
            np.testing.assert_allclose(
                twin[name][:, :, 0][ok], base[name][:, :, 0][ok], atol=1e-5, err_msg=name
            )
        assert not np.allclose(
            twin["entropy"][:, :, 1][ok], base["entropy"][:, :, 1][ok], atol=1e-3
        )


def twin_pair(path, tmp_path, cache_dir):
    """The `layers` config of tiny-random against its tempered twin (gamma 1.7) over `path`."""
    twin = ["model@aligned=tempered", "aligned.base=tiny-random", "aligned.gamma=1.7"]
    return compose_cfg(
        "layers", tmp_path, cache_dir, [f"archive={path}", "model@base=tiny-random", *twin]
    )


def test_layers_command_planted_tempered_twin(lensed, tmp_path, cache_dir):
    """KL(base_l || twin_l) = 0 below the last block; there it equals the pair KL of the two
    stored logit groups, and gamma there is the planted 1.7."""
    path = tmp_path / "a.h5"
    shutil.copy(lensed, path)
    out = layers.run(twin_pair(path, tmp_path, cache_dir))
    assert out["pairing"] == "layer" and out["layers_base"] == [0, 1]
    with Archive(path) as a:
        ok = valid(a)
        lp = a.layer_pairs["tiny-random~tiny-random-tempered-1.7"]
        assert lp.complete and lp.n_complete == a.n_samples and lp.pairing == "layer"
        assert np.abs(lp["kl_base_aligned"][:, :, 0][ok]).max() < 1e-6
        assert np.abs(lp["js"][:, :, 0][ok]).max() < 1e-6
        p = np.concatenate(
            [a.model().rows(i, slice(0, n)) for i, n in enumerate(a.samples()["length"])]
        )
        q = np.concatenate(
            [
                a.model("tiny-random-tempered-1.7").rows(i, slice(0, n))
                for i, n in enumerate(a.samples()["length"])
            ]
        )
        pair = K.pair_stats(p, q)
        np.testing.assert_allclose(
            lp["kl_base_aligned"][:, :, 1][ok], pair.kl_pq, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            lp["kl_aligned_base"][:, :, 1][ok], pair.kl_qp, rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(lp["gamma"][:, :, 1][ok], 1.7, atol=2e-3)
        np.testing.assert_allclose(lp["gamma"][:, :, 0][ok], 1.0, atol=2e-3)
    assert verify(path, progress=False).ok
    with Archive(path) as a:  # offline inspection names both
        text = summary(a)
    assert "layer pairs tiny-random~tiny-random-tempered-1.7: 2 pairs by layer" in text
    assert "logit lens: 2 of 2 blocks (0,1), top-4, resid_post; last-block check" in text
    with pytest.raises(EngineError, match="already has layer pairs"):
        layers.run(twin_pair(path, tmp_path, cache_dir))


def test_layer_chunks_change_nothing(lensed, tmp_path, cache_dir, monkeypatch):
    """One layer per chunk (the memory bound at its tightest) stores what one chunk of every
    layer stores, for the lens and for layer pairs (to float32 rounding: a GEMM of other
    shape rounds differently; ids and ranks exactly)."""
    monkeypatch.setattr(lenses, "CHUNK_ELEMENTS", 1)
    over = ["n_samples=3", "batch_size=2", "max_new_tokens=10", "codec=fp32", "lens=true"]
    cfg = compose_dump(tmp_path, cache_dir, ["model=tiny-random", *over, "lens_topk=4"])
    cfg.capture = HOOKS  # the same run key as the fixture's
    path = dump.run(cfg)["archive"]
    pair = ["model@base=tiny-random", "model@aligned=tempered", "aligned.base=tiny-random"]
    layers.run(compose_cfg("layers", tmp_path, cache_dir, [f"archive={path}", *pair]))
    ref = tmp_path / "ref.h5"
    shutil.copy(lensed, ref)
    monkeypatch.undo()
    layers.run(compose_cfg("layers", tmp_path, cache_dir, [f"archive={ref}", *pair]))
    with Archive(path) as a, Archive(ref) as b:
        for name in F.LENS_STATS:
            x, y = a.model().lens[name][:], b.model().lens[name][:]
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)
        (la,), (lb,) = a.layer_pairs.values(), b.layer_pairs.values()
        for name in F.LAYER_PAIR_STATS:
            np.testing.assert_allclose(la[name][:], lb[name][:], rtol=1e-4, atol=1e-6, err_msg=name)


def test_layers_command_resumes_after_an_interrupt(lensed, tmp_path, cache_dir, monkeypatch):
    """Killed after its second batch, `layers` keeps the committed samples, refuses to start
    over silently, and resume=true ends with what an uninterrupted run stores."""
    from engine.archive import layer_pairs

    whole, cut = tmp_path / "whole.h5", tmp_path / "cut.h5"
    shutil.copy(lensed, whole)
    shutil.copy(lensed, cut)
    pair = ["model@base=tiny-random", "model@aligned=tempered", "aligned.base=tiny-random"]
    args = lambda path, *more: compose_cfg(  # noqa: E731
        "layers", tmp_path, cache_dir, [f"archive={path}", *pair, "batch_size=2", *more]
    )
    layers.run(args(whole))
    real, calls = layer_pairs.LayerPairWriter.commit, []

    def commit_then_die(self, n):
        real(self, n)
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(layer_pairs.LayerPairWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        layers.run(args(cut))
    monkeypatch.undo()
    with Archive(cut) as a:
        (lp,) = a.layer_pairs.values()
        assert not lp.complete and lp.n_complete == calls[-1] == 3
    with pytest.raises(EngineError, match="partly written"):
        layers.run(args(cut))
    assert layers.run(args(cut, "resume=true"))["resumed_from"] == 3
    with Archive(cut) as a, Archive(whole) as b:
        (la,), (lb,) = a.layer_pairs.values(), b.layer_pairs.values()
        assert la.complete
        for name in F.LAYER_PAIR_STATS:
            assert np.array_equal(la[name][:], lb[name][:]), name
    assert verify(cut, progress=False).ok


def switched_off(blocks: int, off: int):
    """tiny-random with `blocks` blocks, the last `off` of them writing nothing to the
    residual stream (attention and MLP output projections zero): an identity residual."""
    model, tok = tiny_random_model(0, torch.float32, layers=blocks)
    with torch.no_grad():
        for layer in model.model.layers[blocks - off :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    prov = {"source": "tiny-random", "name": "tiny-random-llama", "revision": f"off={off}"}
    return wrap(model, tok, "tiny-random-llama", "tiny-off", resolve_device(DEVICE), prov)


def test_switched_off_blocks_give_zero_kl_and_shallow_prediction_depth(tmp_path, cache_dir):
    L, off = 6, 2
    lm = switched_off(L, off)
    cfg = compose_dump(
        tmp_path,
        cache_dir,
        ["model=tiny-random", "model.key=tiny-off", "n_samples=2", "max_new_tokens=8", "lens=true"],
    )
    path = dump.run(cfg, model=lm)["archive"]
    with Archive(path) as a:
        ok, lens = valid(a), a.model().lens
        kl = lens["kl_final"][:][ok]  # [row, layer]
        assert lens.layers.tolist() == list(range(L))
        assert np.abs(kl[:, L - off - 1 :]).max() < 1e-5  # blocks 3, 4, 5 all hold the output
        assert kl[:, : L - off - 1].mean(0).min() > 1e-3
        top1 = lens["rank_final_top"][:][ok] == 1
        # prediction depth: first block from which the lens's top-1 is the output's for good
        stays = np.flip(np.cumprod(np.flip(top1, -1), -1), -1).astype(bool)
        depth = np.argmax(stays, -1)
        assert depth.max() <= L - off - 1


def test_stride_layers_and_perturb_with_lens(tiny_archive, tmp_path, cache_dir):
    cfg = compose_cfg(
        "perturb",
        tmp_path,
        cache_dir,
        [
            f"source={tiny_archive}",
            "model=tiny-random",
            "parents=[0]",
            "cut_after=null",
            "cut_at=3",
            "n_samples=2",
            "max_new_tokens=4",
            "lens=true",
            "lens_layers=stride:4",
        ],
    )
    out = perturb.run(cfg)
    with Archive(out["archive"]) as a:
        lens = a.model().lens
        assert lens.layers.tolist() == [1]  # 2 blocks, stride 4: the last one only
        assert lens["kl_final"].shape == (a.n_samples, 4, 1)
        assert a.run_key["lens"] == {"layers": "stride:4", "k": 5}


def test_lens_settings_refuse_bad_input():
    S = lenses.LensSettings
    assert S(True, "stride:3", 5).resolve(10) == (0, 3, 6, 9)
    assert S(True, (0, -2), 5).resolve(10) == (0, 8, 9)
    with pytest.raises(EngineError, match="out of range"):
        S(True, (12,), 5).resolve(10)
    from omegaconf import OmegaConf

    for bad in ("stride:0", "every", [], [1.5]):
        with pytest.raises(EngineError, match="lens_layers must be"):
            S.from_cfg(OmegaConf.create({"lens": True, "lens_layers": bad, "lens_topk": 5}))
    assert layers.pair_layers(S(True, "all", 1), 4, 8)[2] == "relative depth"
    assert layers.pair_layers(S(True, "all", 1), 4, 8)[0] == (0, 0, 1, 1, 2, 2, 3, 3)


def test_a_non_finite_row_does_not_trip_the_invariant(cache_dir):
    """on_nonfinite=record keeps a batch whose row went NaN: the check covers the finite rows,
    and a wrong lens on those still fails."""
    from engine.runtime.models import load_model
    from engine.runtime.sampling import generate
    from engine.runtime.settings import ModelSpec

    spec = ModelSpec(source="tiny-random", name="tiny-random-llama", key="tiny-random")
    lm = load_model(spec, DEVICE, cache_dir)
    lens = lenses.make(lm, lenses.LensSettings(True, "all", 3))
    steps = generate(lm.bridge, [0, 70, 80], [1, 2, 3], 2, capture=lens.hooks)
    next(steps)
    st = next(steps)  # t = 1: three rows of their own
    st.logits = st.logits.clone()
    st.logits[1] = float("nan")
    stats = lens.stats(st)
    lens.check()
    assert torch.isfinite(stats["lens/entropy"][[0, 2]]).all()
    lens.gamma = 2.0  # a lens that does not reproduce the finite rows
    lens.stats(st)
    with pytest.raises(lenses.LensMismatch):
        lens.check()


def test_lens_invariant_stops_the_run(dump_cfg, monkeypatch):
    """A lens that does not reproduce the logits (here: a tempered twin's lens without its
    gamma) stops the run with one line and leaves only the partial."""
    real = lenses.Lens.__init__

    def no_gamma(self, *a, **kw):
        real(self, *a, **kw)
        self.gamma = 1.0

    monkeypatch.setattr(lenses.Lens, "__init__", no_gamma)
    cfg = dump_cfg(*TEMPERED, "n_samples=2", "max_new_tokens=3", "lens=true")
    with pytest.raises(lenses.LensMismatch, match="logit lens check failed"):
        dump.run(cfg)
    assert not Path(cfg.out).exists() and Path(str(cfg.out) + ".partial").exists()
