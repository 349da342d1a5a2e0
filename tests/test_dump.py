"""`dump` on the tiny-random model: layout, determinism, agreement with a teacher-forced
HuggingFace forward, EOS handling, hook capture, and the overwrite/resume rules."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.errors import EngineError
from engine.runtime import output
from engine.runtime import run as run_mod
from engine.runtime.models import load_model, tiny_random_model
from engine.runtime.settings import ModelSpec
from tests.conftest import DEVICE


def hf_teacher_forced(prompt_ids, tokens, seed=0):
    """float64-free independent path: plain HF forward over prompt + generated tokens."""
    model, _ = tiny_random_model(seed, torch.float32)
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0]  # [pos, vocab]
    n = len(prompt_ids)
    return logits[n - 1 : n - 1 + len(tokens)].double().numpy()  # row t predicts token t


def test_archive_layout_and_provenance(tiny_archive):
    with Archive(tiny_archive) as a:
        assert a.complete and a.n_complete == a.n_samples == 6
        assert a.prompts == ["Grace Hopper was", "Steve is the CEO of a startup company"]
        s = a.samples()
        assert s["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
        m = a.model()
        assert m.logits.shape == (6, 12, 258) and m.codec == "fp32"
        assert m.logits.chunks == (1, 12, 258)
        for k in (
            "source",
            "name",
            "revision",
            "weights_sha256",
            "tokenizer_name",
            "vocab_hash",
            "dtype",
            "vocab_size",
        ):
            assert k in m.provenance, k
        for k in ("config_yaml", "packages", "git_commit", "created", "format_version"):
            assert k in a.f.attrs, k
        assert len(set(s["seed"].tolist())) == 6


def test_logits_equal_teacher_forced_hf_forward(tiny_archive):
    with Archive(tiny_archive) as a:
        s, m = a.samples(), a.model()
        for i in range(a.n_samples):
            n = int(s["length"][i])
            prompt = m.group["prompt_tokens"][int(s["prompt_index"][i])]
            ref = hf_teacher_forced(prompt, s["tokens"][i, :n])
            got = m.rows(i, slice(0, n)).astype(np.float64)
            np.testing.assert_allclose(
                got,
                ref,
                atol=2e-5,
                rtol=0,
                err_msg=f"sample {i}: max_diff={np.abs(got - ref).max()}",
            )
            # the sampled token is one the model gave non-negligible probability (pure
            # sampling at T = 1: a token below 1e-6 appears once in a million draws)
            toks = s["tokens"][i, :n]
            lp = ref[np.arange(n), toks] - np.logaddexp.reduce(ref, axis=-1)
            assert np.all(lp > np.log(1e-6)), f"sample {i}: min p={np.exp(lp.min()):.2e}"


def test_same_config_and_seed_give_same_content(dump_cfg, tmp_path):
    a = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=6", f"out={tmp_path}/a.h5"))
    b = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=6", f"out={tmp_path}/b.h5"))
    c = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=6", "seed=1", f"out={tmp_path}/c.h5"))
    with (
        h5py.File(a["archive"]) as fa,
        h5py.File(b["archive"]) as fb,
        h5py.File(c["archive"]) as fc,
    ):
        for name in ("samples/tokens", "samples/length", "models/tiny-random/logits"):
            assert np.array_equal(fa[name][()], fb[name][()]), name
        assert not np.array_equal(fa["samples/tokens"][()], fc["samples/tokens"][()])


def test_batch_size_does_not_change_tokens(dump_cfg, tmp_path):
    a = dump_mod.run(
        dump_cfg("n_samples=3", "batch_size=1", "max_new_tokens=8", f"out={tmp_path}/a.h5")
    )
    b = dump_mod.run(
        dump_cfg("n_samples=3", "batch_size=3", "max_new_tokens=8", f"out={tmp_path}/b.h5")
    )
    with Archive(a["archive"]) as fa, Archive(b["archive"]) as fb:
        assert np.array_equal(fa.samples()["tokens"], fb.samples()["tokens"])
        np.testing.assert_allclose(fa.model().rows(2), fb.model().rows(2), atol=1e-2)


def test_batches_across_prompts_are_left_padded_and_exact(dump_cfg, tmp_path):
    """The seed prompts (4 and 8 tokens) x 3 samples in batches of 4: batch 0..3 reads both
    prompts, the shorter left-padded.  Every row equals an independent HF forward over its own
    prompt + tokens (no padding; wrong position ids or an unmasked pad would move it), the
    tokens equal one-prompt batches' (batch_across_prompts=false), and the run key says
    which batches the run decoded."""
    common = ("n_samples=3", "batch_size=4", "max_new_tokens=10", "codec=fp32")
    a = dump_mod.run(dump_cfg(*common, f"out={tmp_path}/a.h5"))
    b = dump_mod.run(dump_cfg(*common, "batch_across_prompts=false", f"out={tmp_path}/b.h5"))
    with Archive(a["archive"]) as fa, Archive(b["archive"]) as fb:
        assert fa.run_key["batches"] == "across prompts" and "batches" not in fb.run_key
        s, m = fa.samples(), fa.model()
        assert np.array_equal(s["tokens"], fb.samples()["tokens"])
        prompts = [m.group["prompt_tokens"][p] for p in (0, 1)]
        assert len(prompts[0]) != len(prompts[1]) and s["prompt_index"][2:4].tolist() == [0, 1]
        for i in range(fa.n_samples):
            n = int(s["length"][i])
            ref = hf_teacher_forced(prompts[int(s["prompt_index"][i])], s["tokens"][i, :n])
            got = m.rows(i, slice(0, n)).astype(np.float64)
            assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-18 + 1e-5), i


def test_eos_ends_samples_and_rows_are_padded(dump_cfg, tmp_path):
    """Treat the tiny model's most frequent tokens as EOS so samples end early."""
    cfg = dump_cfg(
        "n_samples=4", "batch_size=4", "max_new_tokens=30", "codec=fp16", f"out={tmp_path}/eos.h5"
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    lm.eos_ids = tuple(range(2, 258, 3))  # a third of the vocabulary ends a sample
    res = dump_mod.run(cfg, model=lm)
    with Archive(res["archive"]) as a:
        s, m = a.samples(), a.model()
        L = s["length"]
        assert L.min() < 30, "some sample must end early"
        for i in range(a.n_samples):
            n = int(L[i])
            ended = int(s["tokens"][i, n - 1]) % 3 == 2
            assert bool(s["finish_reason"][i]) == ended
            if n < 30:
                assert ended
                assert np.all(s["tokens"][i, n:] == -1)
            prompt = m.group["prompt_tokens"][int(s["prompt_index"][i])]
            ref = hf_teacher_forced(prompt, s["tokens"][i, :n])
            got = m.rows(i, slice(0, n)).astype(np.float64)
            assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-11 + 2e-5)


def test_capture_stores_residual_stream(dump_cfg, tmp_path):
    res = dump_mod.run(
        dump_cfg(
            "n_samples=2",
            "max_new_tokens=5",
            "capture=[blocks.0.hook_resid_post]",
            f"out={tmp_path}/cap.h5",
        )
    )
    model, _ = tiny_random_model(0, torch.float32)
    with Archive(res["archive"]) as a:
        s, m = a.samples(), a.model()
        acts = m.group["activations/blocks.0.hook_resid_post"]
        assert acts.shape == (4, 5, 64)  # 2 prompts x 2 samples
        prompt = list(m.group["prompt_tokens"][0])
        ids = torch.tensor([prompt + list(s["tokens"][0])])
        with torch.no_grad():
            # hidden_states[1] is block 0's output (the last entry is after the final norm)
            hs = model(ids, output_hidden_states=True).hidden_states[1][0]
        n = len(prompt)
        np.testing.assert_allclose(acts[0], hs[n - 1 : n + 4].numpy(), atol=1e-4)


def test_q16_and_bf16_archives_decode_within_tolerance(dump_cfg, tmp_path, tiny_archive):
    with Archive(tiny_archive) as ref:
        exact = ref.model().rows(0)
    for codec, tol in (("bf16", np.abs(exact).max() * 2.0**-8), ("q16", 2e-4)):
        res = dump_mod.run(
            dump_cfg(
                "n_samples=3",
                "batch_size=2",
                "max_new_tokens=12",
                f"codec={codec}",
                f"out={tmp_path}/{codec}.h5",
            )
        )
        with Archive(res["archive"]) as a:
            got = a.model().rows(0).astype(np.float64)
        want = exact.astype(np.float64)
        if codec == "q16":  # q16 stores log-probabilities
            want = (
                want
                - np.log(np.exp(want - want.max(1, keepdims=True)).sum(1, keepdims=True))
                - want.max(1, keepdims=True)
            )
            inside = want >= want.max(1, keepdims=True) - 24
            assert np.abs(got - want)[inside].max() <= tol
        else:
            assert np.abs(got - want).max() <= tol


def test_existing_archive_is_not_overwritten(dump_cfg, tmp_path):
    out = tmp_path / "x.h5"
    out.write_bytes(b"precious")
    with pytest.raises(EngineError, match="overwrite=true"):
        dump_mod.run(dump_cfg("n_samples=1", "max_new_tokens=2", f"out={out}"))
    assert out.read_bytes() == b"precious"
    dump_mod.run(dump_cfg("n_samples=1", "max_new_tokens=2", f"out={out}", "overwrite=true"))
    with Archive(out) as a:
        assert a.complete


def test_leftover_partial_needs_resume_or_overwrite(dump_cfg, tmp_path):
    out = tmp_path / "y.h5"
    (tmp_path / "y.h5.partial").write_bytes(b"half")
    with pytest.raises(EngineError, match="resume=true"):
        dump_mod.run(dump_cfg("n_samples=1", "max_new_tokens=2", f"out={out}"))
    with pytest.raises(EngineError, match="not a readable HDF5"):
        dump_mod.run(dump_cfg("n_samples=1", "max_new_tokens=2", f"out={out}", "resume=true"))
    assert not out.exists()


def test_resume_refuses_different_settings(dump_cfg, tmp_path, monkeypatch):
    out = tmp_path / "z.h5"

    def crash(*a):
        raise RuntimeError("simulated crash before the final rename")

    monkeypatch.setattr(output, "atomic_replace", crash)  # leaves the partial behind
    with pytest.raises(RuntimeError, match="simulated"):
        dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=3", f"out={out}"))
    monkeypatch.undo()
    assert (tmp_path / "z.h5.partial").exists() and not out.exists()
    with pytest.raises(EngineError, match="different settings.*seed"):
        dump_mod.run(
            dump_cfg("n_samples=2", "max_new_tokens=3", "seed=5", f"out={out}", "resume=true")
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("n_samples=0", "n_samples"),
        ("temperature=0", "temperature"),
        ("temperature=-1", "temperature"),
        ("max_new_tokens=-1", "max_new_tokens"),
        ("top_p=0", "top_p"),
        ("codec=int8", "codec"),
        ("batch_size=0", "batch_size"),
    ],
)
def test_bad_settings_raise_before_loading(dump_cfg, tmp_path, override, message, monkeypatch):
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(EngineError, match=message):
        dump_mod.run(dump_cfg(override, f"out={tmp_path}/bad.h5"))
    assert not list(tmp_path.glob("bad.h5*"))


def test_zero_new_tokens_gives_empty_but_valid_archive(dump_cfg, tmp_path):
    res = dump_mod.run(dump_cfg("n_samples=2", "max_new_tokens=0", f"out={tmp_path}/e.h5"))
    with Archive(res["archive"]) as a:
        assert a.complete and a.samples()["length"].tolist() == [0, 0, 0, 0]


def test_draw_matches_the_sampling_distribution():
    """Inverse-CDF draws follow softmax(x): chi-square-style check on a planted distribution,
    and zero-probability tokens are never drawn."""
    from engine.runtime.sampling import draw, uniforms

    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    x = torch.log(p).expand(4000, -1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    counts = torch.bincount(draw(x, uniforms(gens)), minlength=5).double() / 4000
    assert counts[1] == 0 and counts[4] == 0
    assert torch.allclose(counts, p.double(), atol=0.03), counts


def test_generation_keeps_its_context_when_the_config_disables_the_cache(dump_cfg, tmp_path):
    """A model saved by a trainer can carry use_cache=False (TRL's DPO does); the sampling loop
    must still decode with its KV cache, i.e. every step sees the whole context."""
    cfg = dump_cfg("n_samples=2", "max_new_tokens=8", "codec=fp32", f"out={tmp_path}/nc.h5")
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)
    lm.bridge.original_model.config.use_cache = False
    res = dump_mod.run(cfg, model=lm)
    with Archive(res["archive"]) as a:
        s, m = a.samples(), a.model()
        for i in range(a.n_samples):
            n = int(s["length"][i])
            ref = hf_teacher_forced(m.prompt_tokens(int(s["prompt_index"][i])), s["tokens"][i, :n])
            got = m.rows(i, slice(0, n)).astype(np.float64)
            assert np.abs(got - ref).max() < 2e-5, f"sample {i}: max_diff={np.abs(got - ref).max()}"
