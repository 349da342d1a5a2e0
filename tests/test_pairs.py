"""score, the tempered twin, and perturb on tiny-random archives."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import kernels as K
from engine.archive import Archive
from engine.archive import writer as archive_mod
from engine.commands import dump as dump_mod
from engine.commands import perturb as perturb_mod
from engine.commands import score as score_mod
from engine.errors import EngineError
from engine.runtime.models import load_model
from engine.runtime.settings import ModelSpec
from engine.stream import map_pairs
from tests.conftest import DEVICE, compose_cfg


@pytest.fixture
def source(dump_cfg, tmp_path):
    """Fresh fp32 tiny-random archive: 2 prompts x 3 samples x 10 steps."""
    return dump_mod.run(
        dump_cfg(
            "n_samples=3",
            "batch_size=2",
            "max_new_tokens=10",
            "codec=fp32",
            f"out={tmp_path}/src.h5",
        )
    )["archive"]


def score(tmp_path, cache_dir, archive, *overrides):
    return score_mod.run(
        compose_cfg("score", tmp_path, cache_dir, [f"archive={archive}", *overrides])
    )


TEMPERED = ["model=tempered", "model.base=tiny-random", "model.gamma=1.7"]


def test_tempered_twin_pairs_every_step_and_its_gamma_is_recovered(source, tmp_path, cache_dir):
    res = score(tmp_path, cache_dir, source, *TEMPERED, "batch_size=2")
    assert res["model"] == "tiny-random-tempered-1.7"
    with Archive(source) as a:
        assert set(a.models) == {"tiny-random", "tiny-random-tempered-1.7"}
        twin = a.model("tiny-random-tempered-1.7")
        assert twin.complete and twin.n_complete == a.n_samples == 6
        assert twin.provenance["source"] == "tempered" and twin.provenance["gamma"] == 1.7
        assert "synthetic" in twin.provenance["name"]
        s = a.samples()
        for i in range(a.n_samples):
            n = int(s["length"][i])
            np.testing.assert_allclose(
                twin.rows(i, slice(0, n)),
                1.7 * a.model().rows(i, slice(0, n)),
                atol=2e-4,
                rtol=1e-5,
            )
        out, sample, step = map_pairs(
            a,
            lambda p, q, t: K.fit_gamma(p, q),
            "tiny-random",
            "tiny-random-tempered-1.7",
            progress=False,
        )
        assert len(out["gamma"]) == int(s["length"].sum())
        np.testing.assert_allclose(out["gamma"], 1.7, atol=1e-4)
        pooled = K.fit_gamma_pooled(
            np.concatenate([a.model().rows(i) for i in range(6)]),
            np.concatenate([twin.rows(i) for i in range(6)]),
            n_boot=200,
        )
        assert pooled.gamma == pytest.approx(1.7, abs=1e-4)


def test_scoring_the_generator_reproduces_its_logits(source, tmp_path, cache_dir):
    score(tmp_path, cache_dir, source, "model=tiny-random", "model.key=rescored")
    with Archive(source) as a:
        s = a.samples()
        for i in range(a.n_samples):
            n = int(s["length"][i])
            got, want = a.model("rescored").rows(i, slice(0, n)), a.model().rows(i, slice(0, n))
            assert np.abs(got - want).max() < 2e-5, (
                f"sample {i}: max_diff={np.abs(got - want).max()}"
            )
        assert np.array_equal(
            a.model("rescored").group["prompt_tokens"][0], a.model().group["prompt_tokens"][0]
        )


def test_score_refuses_the_generator_key_and_existing_groups(source, tmp_path, cache_dir):
    with pytest.raises(EngineError, match="generator"):
        score(tmp_path, cache_dir, source, "model=tiny-random")
    score(tmp_path, cache_dir, source, *TEMPERED)
    before = h5py.File(source, "r")["models/tiny-random-tempered-1.7/logits"][()]
    with pytest.raises(EngineError, match="overwrite=true"):
        score(tmp_path, cache_dir, source, *TEMPERED)
    score(tmp_path, cache_dir, source, *TEMPERED, "overwrite=true")
    with h5py.File(source, "r") as f:
        assert np.array_equal(f["models/tiny-random-tempered-1.7/logits"][()], before)


def test_score_refuses_mismatched_tokenizers(source, tmp_path, cache_dir):
    def other_vocab(*overrides):
        cfg = compose_cfg(
            "score", tmp_path, cache_dir, [f"archive={source}", *TEMPERED, *overrides]
        )
        lm = load_model(ModelSpec.from_node(cfg.model), DEVICE, cache_dir)
        lm.provenance = {**lm.provenance, "vocab_hash": "0" * 64, "tokenizer_name": "other"}
        return score_mod.run(cfg, model=lm)

    with pytest.raises(EngineError, match="tokenizer mismatch"):
        other_vocab()
    with h5py.File(source, "r") as f:
        assert list(f["models"]) == ["tiny-random"], "nothing may be written on refusal"
    other_vocab("allow_tokenizer_mismatch=true")
    with Archive(source) as a:
        assert a.model("tiny-random-tempered-1.7").complete


def test_interrupted_scoring_resumes_to_the_same_rows(source, tmp_path, cache_dir, monkeypatch):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = ref_dir / "ref.h5"
    ref.write_bytes(open(source, "rb").read())
    score(tmp_path, cache_dir, ref, *TEMPERED, "batch_size=1")
    calls = {"n": 0}
    real_commit = archive_mod.ModelWriter.commit

    def crash_after_two(self, n):
        real_commit(self, n)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # stands in for a kill after two committed batches

    monkeypatch.setattr(archive_mod.ModelWriter, "commit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        score(tmp_path, cache_dir, source, *TEMPERED, "batch_size=1")
    monkeypatch.undo()
    with Archive(source) as a:
        twin = a.model("tiny-random-tempered-1.7")
        assert twin.n_complete == 2 and not twin.complete
    with pytest.raises(EngineError, match="resume=true"):
        score(tmp_path, cache_dir, source, *TEMPERED, "batch_size=1")
    res = score(tmp_path, cache_dir, source, *TEMPERED, "batch_size=1", "resume=true")
    assert res["resumed_from"] == 2
    with h5py.File(source, "r") as f, h5py.File(ref, "r") as g:
        key = "models/tiny-random-tempered-1.7/logits"
        assert np.array_equal(f[key][()], g[key][()])


def perturb(tmp_path, cache_dir, src, *overrides):
    return perturb_mod.run(
        compose_cfg(
            "perturb",
            tmp_path,
            cache_dir,
            [
                f"source={src}",
                "model=tiny-random",
                "n_samples=3",
                "batch_size=3",
                "max_new_tokens=5",
                f"out={tmp_path}/pert.h5",
                *overrides,
            ],
        )
    )


def test_perturb_edit_lineage_and_matched_controls(source, tmp_path, cache_dir):
    res = perturb(
        tmp_path,
        cache_dir,
        source,
        "parents=[0,1]",
        "cut_after=null",
        "cut_at=3",
        "edit.replace=[' was',' was not']",
        "edit.delete=1",
    )
    with Archive(res["archive"]) as a, Archive(source) as src:
        lin = a.f["lineage"]
        assert lin["parent_sample"][()].tolist() == [0, 0, 1, 1]
        assert lin["variant"][()].tolist() == [0, 1, 0, 1]  # control, edit, control, edit
        assert lin["control_prompt"][()].tolist() == [0, 0, 2, 2]
        assert lin["cut"][()].tolist() == [3, 3, 3, 3]
        assert "replace ' was' -> ' was not'" in lin["edit"].asstr()[1]
        ss, m = src.samples(), src.model()
        pt = a.model().group["prompt_tokens"]
        # control 0: parent 0's prompt + its first 3 sampled tokens, exactly
        parent_prompt = list(m.group["prompt_tokens"][0])
        assert list(pt[0]) == parent_prompt + list(ss["tokens"][0, :3])
        # edit: the prompt text edited ("Grace Hopper was" -> "... was not"), 1 token dropped
        edited = a.prompts[1]
        assert "Grace Hopper was not" in edited
        assert "Grace Hopper was not" in a.prompts[3] and "was not" not in a.prompts[2]
        s = a.samples()
        # continuation j of an edit shares its seed with continuation j of its control
        assert np.array_equal(s["seed"][3:6], s["seed"][0:3])
        assert np.array_equal(s["seed"][9:12], s["seed"][6:9])
        assert len(set(s["seed"][0:3])) == 3
        assert a.model().rows(0).shape == (5, 258)


def test_perturb_fork_takes_the_ranked_alternative(source, tmp_path, cache_dir):
    res = perturb(tmp_path, cache_dir, source, "parents=[1]", "fork={step: 2, rank: 2}")
    with Archive(res["archive"]) as a, Archive(source) as src:
        lin = a.f["lineage"]
        assert lin["variant"][()].tolist() == [0, 2]
        ss = src.samples()
        row = src.model().rows(1, 2)
        sampled = int(ss["tokens"][1, 2])
        others = [int(i) for i in np.argsort(-row, kind="stable") if i != sampled]
        control, fork = (
            list(a.model().group["prompt_tokens"][0]),
            list(a.model().group["prompt_tokens"][1]),
        )
        assert control[-1] == sampled and fork[-1] == others[1]
        assert control[:-1] == fork[:-1]


@pytest.mark.parametrize(
    "overrides, msg",
    [
        (["parents=[99]"], "out of range"),
        (["cut_after='zzz'"], "does not occur"),
        (["edit.replace=['qqq','x']", "cut_after=null", "cut_at=2"], "does not occur"),
        (["fork={step: 99, rank: 1}"], "fork.step"),
    ],
)
def test_perturb_bad_input(source, tmp_path, cache_dir, overrides, msg):
    with pytest.raises(EngineError, match=msg):
        perturb(tmp_path, cache_dir, source, *overrides)
    assert not (tmp_path / "pert.h5").exists()
