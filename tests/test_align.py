"""engine align: the Bradley-Terry label rule, the build on tiny-random (cache, provenance,
reload through a model config), and the measured sharpening of a strong-alpha twin against
its alpha = 0 control on held-out prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import kernels as K
from engine.archive import Archive
from engine.commands import align as align_mod
from engine.commands import dump as dump_mod
from engine.commands import score as score_mod
from engine.errors import EngineError
from engine.runtime.models import load_model
from engine.runtime.settings import ModelSpec
from tests.conftest import DEVICE, compose_cfg

TINY = [
    "model=tiny-random",
    "n_samples=2",
    "max_new_tokens=8",
    "min_tokens=4",
    "train.epochs=1",
    "train.batch_pairs=8",
    "progress=false",
]


def test_label_rule_matches_a_hand_computation():
    """Two prompts x 2 completions, lengths (10, 6) and (3, 9): pair 0 is cut to 6 tokens,
    pair 1 (common length 3) is dropped by min_tokens=4.  Draw order: noise of every
    sample, then one u per pair (dropped pairs included)."""
    logp = np.full((4, 10), np.nan)
    logp[0] = -0.1 * np.arange(1, 11)
    logp[1, :6] = -0.5
    logp[2, :3] = -1.0
    logp[3, :9] = -0.2
    length = np.array([10, 6, 3, 9])
    alpha, noise, seed = 0.8, 0.3, 11
    out = align_mod.bradley_terry_labels(logp, length, 2, 4, alpha, noise, seed)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(4)
    u = rng.random(2)
    s0 = -0.1 * (1 + 2 + 3 + 4 + 5 + 6)  # sample 0 over its first 6 tokens only
    s1 = -0.5 * 6
    r0, r1 = alpha * s0 + noise * z[0], alpha * s1 + noise * z[1]
    p0 = 1 / (1 + math.exp(-(r0 - r1)))
    assert len(out) == 1
    lb = out[0]
    assert (lb["a"], lb["b"], lb["length"], lb["prompt"]) == (0, 1, 6, 0)
    assert lb["logp_a"] == pytest.approx(s0) and lb["logp_b"] == pytest.approx(s1)
    assert lb["p_a"] == pytest.approx(p0) and lb["u"] == pytest.approx(u[0])
    assert lb["chosen"] == (0 if u[0] < p0 else 1) and {lb["chosen"], lb["rejected"]} == {0, 1}


def test_alpha_zero_is_a_coin_flip_and_large_alpha_follows_the_likelihood():
    rng = np.random.default_rng(0)
    logp = rng.normal(-2, 1, (400, 12))
    length = np.full(400, 12)
    coin = align_mod.bradley_terry_labels(logp, length, 4, 4, 0.0, 0.0, 1)
    assert len(coin) == 200 and all(lb["p_a"] == 0.5 for lb in coin)
    wins = np.mean([lb["chosen"] == lb["a"] for lb in coin])
    assert abs(wins - 0.5) < 3 * 0.5 / math.sqrt(200)  # binomial noise
    sure = align_mod.bradley_terry_labels(logp, length, 4, 4, 50.0, 0.0, 1)
    for lb in sure:
        higher = lb["a"] if lb["logp_a"] > lb["logp_b"] else lb["b"]
        assert lb["chosen"] == higher


def align(tmp_path, cache_dir, *overrides):
    cfg = compose_cfg("align", tmp_path, cache_dir, [*TINY, *overrides])
    return align_mod.run(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny build, in its own cache (module scope: reused by several tests)."""
    cache = tmp_path_factory.mktemp("align-cache")
    tmp = tmp_path_factory.mktemp("align")
    return align(tmp, cache, "name=tiny-typ", "alpha=5"), cache, tmp


def test_build_writes_a_model_directory_with_provenance(built):
    res, cache, _ = built
    path = Path(res["path"])
    assert path.parent == cache / "aligned" and path.name.startswith("tiny-typ-")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()
    # the candidates archive is shared by builds that differ only in labels or training
    assert len(list((cache / "aligned" / "candidates").glob("*.h5"))) == 1
    prov = json.loads((path / "provenance.json").read_text())
    for k in (
        "build_id",
        "reference",
        "alpha",
        "beta",
        "k",
        "prompts_sha256",
        "labels_sha256",
        "steps",
        "seed",
        "trl",
        "final_loss",
        "reward_accuracy",
        "weights_sha256",
    ):
        assert k in prov, k
    assert prov["alpha"] == 5 and prov["predicted_gamma"] == pytest.approx(1 + 5 / 0.57)
    assert prov["n_pairs"] > 150 and prov["steps"] == math.ceil(prov["n_pairs"] / 8)
    assert prov["label_agrees_with_likelihood"] > 0.9  # alpha = 5 follows the likelihood
    # TRL's reference log-probs (float32 HF forward) equal ours from the stored q16 logits
    assert prov["ref_logp_max_abs_diff"] < 5e-3
    assert json.loads((path / "config.json").read_text())["use_cache"] is True  # TRL had it off
    labels = json.loads((path / "labels.json").read_text())
    assert len(labels) == prov["n_pairs"]
    assert (cache / "aligned" / "tiny-typ.latest").read_text().strip() == prov["build_id"]


def test_build_records_its_checks_and_they_pass(built):
    """The twin's provenance records both gates and the library versions it was built with:
    TRL's reference log-probs within the candidates' self-check bound per token, and the
    first DPO loss at ln 2 (policy == reference at step one)."""
    res, _, _ = built
    prov = json.loads((Path(res["path"]) / "provenance.json").read_text())
    c = prov["checks"]
    assert 0 <= c["ref_logp_max_abs_diff"] <= c["ref_logp_bound"]
    assert c["token_bound"] > 0 and c["ref_logp_bound"] < 0.05
    assert abs(c["first_loss"] - math.log(2)) <= c["first_loss_tolerance"] < 0.05
    for lib in ("torch", "transformers", "transformer-lens", "trl", "numba", "h5py"):
        assert prov[lib], lib


def test_corrupted_reference_logprobs_refuse_the_build(built, tmp_path_factory):
    """The candidates' stored q16 scales stretched by 2% (every log-prob gap widens, so the
    normalised log pi_ref moves too; a constant shift would cancel): TRL's forward disagrees,
    the build stops with one line before training, and nothing is cached."""
    import shutil

    import h5py

    _, cache, tmp = built
    bad = tmp_path_factory.mktemp("align-corrupt")
    shutil.copytree(cache / "aligned" / "candidates", bad / "aligned" / "candidates")
    (cand,) = (bad / "aligned" / "candidates").glob("*.h5")
    with h5py.File(cand, "r+") as f:
        (g,) = f["models"].values()
        g["logits_scale"][...] = g["logits_scale"][...] * np.float32(1.02)
    with pytest.raises(EngineError, match="reference log-probs differ"):
        align(tmp, bad, "name=tiny-typ", "alpha=5")
    assert not list((bad / "aligned").glob("tiny-typ-*"))  # no build directory
    assert not (bad / "aligned" / "tiny-typ.latest").exists()


def test_first_loss_must_be_ln2():
    """The callback stops training at the first logged loss unless it is ln 2 within
    beta * seq_bound (the 5.98 of the context-free build is refused; ln 2 passes)."""
    from types import SimpleNamespace

    cb = align_mod.first_loss_callback(0.57, 0.01)
    state = SimpleNamespace(global_step=1)
    assert not cb.checked
    cb.on_log(None, state, None, logs={"loss": math.log(2) + 0.005})
    assert cb.checked  # train_dpo refuses a build whose first loss was never seen
    with pytest.raises(EngineError, match="first DPO loss is 5.9800"):
        cb.on_log(None, state, None, logs={"loss": 5.98})
    cb.on_log(None, SimpleNamespace(global_step=2), None, logs={"loss": 5.98})  # later: free


def test_build_made_before_the_checks_is_refused_on_load(built, tmp_path):
    """A provenance.json without `checks` (a build from before them) is refused on load,
    naming the rebuild command."""
    import shutil

    res, cache, _ = built
    old = tmp_path / "cache"
    src = Path(res["path"])
    shutil.copytree(src, old / "aligned" / src.name)
    prov = json.loads((src / "provenance.json").read_text())
    del prov["checks"]
    (old / "aligned" / src.name / "provenance.json").write_text(json.dumps(prov))
    (old / "aligned" / "tiny-typ.latest").write_text(prov["build_id"] + "\n")
    cfg = compose_cfg("dump", tmp_path, old, ["model=aligned", "model.name=tiny-typ"])
    with pytest.raises(EngineError, match="built before twins were checked.*overwrite=true"):
        load_model(ModelSpec.from_node(cfg.model), DEVICE, old)


def test_same_config_is_cached_and_another_builds_another(built, tmp_path):
    res, cache, tmp = built
    again = align(tmp, cache, "name=tiny-typ", "alpha=5")
    assert again["cached"] and again["path"] == res["path"]
    other = align(tmp, cache, "name=tiny-typ", "alpha=5", "label_seed=1")
    assert not other["cached"] and other["path"] != res["path"]
    assert other["candidates_seconds"] < 1.0  # new labels, the same candidates: not sampled again
    assert len(list((cache / "aligned" / "candidates").glob("*.h5"))) == 1
    # the newest build is the one a model config without `build` loads; an id picks one
    assert (cache / "aligned" / "tiny-typ.latest").read_text().strip() == other["build_id"]


def test_candidates_only_samples_them_once_for_the_builds_that_share_them(built, tmp_path, capsys):
    """`candidates_only=true` (make demo's first step) samples the candidates and stops: no
    build directory; a build (or its control) then trains on them without sampling; for a
    config already built it is the cached build.  progress=false prints no step logs."""
    res, cache, tmp = built
    assert align(tmp, cache, "name=tiny-typ", "alpha=5", "candidates_only=true")["cached"]
    cache = tmp_path / "cache"  # a cache of its own: the module's build keeps one candidates file
    cand = align(tmp_path, cache, "name=tiny-short", "max_new_tokens=6", "candidates_only=true")
    assert Path(cand["candidates"]).is_file() and "build_id" not in cand
    assert [p.name for p in (cache / "aligned").iterdir()] == ["candidates"]  # no build, no .build-
    stamp = Path(cand["candidates"]).stat().st_mtime_ns
    one = align(tmp_path, cache, "name=tiny-short", "max_new_tokens=6", "threads=1")
    assert not one["cached"] and one["candidates_seconds"] < 1.0 and one["threads"] == 1
    assert Path(cand["candidates"]).stat().st_mtime_ns == stamp  # read, not sampled again
    assert len(list((cache / "aligned" / "candidates").glob("*.h5"))) == 1
    assert "'loss'" not in capsys.readouterr().out


def test_compact_lm_head_scores_only_the_completions_and_keeps_the_log_probs(tmp_path, cache_dir):
    """With `compact_lm_head` TRL's fused LM head receives one row per completion token
    (not one per position) and the sequence log-probs are the same to float32 rounding;
    TRL's own choice (every position on the CPU) is back afterwards."""
    import torch
    import trl.trainer.utils as tu

    from engine.runtime.models import load_hf_source

    cfg = compose_cfg("align", tmp_path, cache_dir, TINY)
    model, tok, _ = load_hf_source(ModelSpec.from_node(cfg.model), cache_dir)
    rng = np.random.default_rng(0)
    examples = [
        {
            "prompt_ids": rng.integers(3, 100, int(rng.integers(4, 9))).tolist(),
            "chosen_ids": rng.integers(3, 100, 5).tolist(),
            "rejected_ids": rng.integers(3, 100, int(rng.integers(2, 6))).tolist(),
            "ref_chosen_logps": 0.0,
            "ref_rejected_logps": 0.0,
        }
        for _ in range(4)
    ]
    trainer = align_mod.dpo_trainer(cfg, model, tok, examples, tmp_path / "trainer")
    batch = trainer.data_collator([{k: e[k] for k in align_mod.COLUMNS[:3]} for e in examples])
    rows, apply = [], tu._ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    out = {}
    tu._ChunkedLogProbFunction.apply = spy
    try:
        for compact in (False, True):
            with align_mod.compact_lm_head(compact), torch.no_grad():
                out[compact] = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    finally:
        tu._ChunkedLogProbFunction.apply = apply
    n_completion = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    full = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert rows == [full, n_completion] and n_completion < full / 2
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)
    assert not tu._use_triton(torch.device("cpu"))


def test_compact_lm_head_and_threads_are_undone_on_error_and_refused_without_trls_choice(
    monkeypatch,
):
    """Both settings hold only inside their block, an exception included; a TRL without the
    choice of positions is one line naming the setting."""
    import torch
    import trl.trainer.utils as tu

    choice, threads = tu._use_triton, torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with align_mod.torch_threads(threads + 1) as n, align_mod.compact_lm_head(True):
            assert n == threads + 1 == torch.get_num_threads()
            assert tu._use_triton(torch.device("cpu"))
            raise RuntimeError("inside")
    assert tu._use_triton is choice and torch.get_num_threads() == threads
    monkeypatch.delattr(tu, "_use_triton")
    with pytest.raises(EngineError, match="train.compact_lm_head=false"):
        with align_mod.compact_lm_head(True):
            pass


def test_model_config_loads_the_build_and_names_the_command_when_missing(built, tmp_path):
    res, cache, _ = built
    cfg = compose_cfg(
        "dump",
        tmp_path,
        cache,
        ["model=aligned", "model.name=tiny-typ", f"model.build={res['build_id']}"],
    )
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE, cache)
    assert lm.provenance["source"] == "aligned" and lm.provenance["revision"] == res["build_id"]
    assert json.loads(lm.provenance["alignment"])["alpha"] == 5
    ref = load_model(
        ModelSpec.from_node(compose_cfg("dump", tmp_path, cache, ["model=tiny-random"]).model),
        DEVICE,
        cache,
    )
    assert lm.provenance["vocab_hash"] == ref.provenance["vocab_hash"]
    import torch

    ids = torch.tensor([[0, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        diff = (lm.bridge(ids) - ref.bridge(ids)).abs().max().item()
    assert diff > 1e-4, "training changed nothing"
    missing = compose_cfg("dump", tmp_path, cache, ["model=smollm2-135m-random-dpo"])
    with pytest.raises(EngineError, match="alpha=0 name=smollm2-135m-random-dpo"):
        load_model(ModelSpec.from_node(missing.model), DEVICE, cache)


def test_bad_settings_are_refused_before_any_work(tmp_path, cache_dir):
    for bad, msg in (
        ("n_samples=3", "even"),
        ("beta=0", "beta"),
        ("alpha=-1", "alpha"),
        ("min_tokens=99", "min_tokens"),
        ("threads=0", "threads"),
        ("threads=true", "threads"),
    ):
        with pytest.raises(EngineError, match=msg):
            align(tmp_path, cache_dir, "name=bad", bad)
    assert not (cache_dir / "aligned").exists() or not list((cache_dir / "aligned").glob("*bad*"))


def pooled_gamma(archive: str, base: str, twin: str):
    with Archive(archive) as a:
        s = a.samples()
        p = np.concatenate(
            [a.model(base).rows(i, slice(0, int(s["length"][i]))) for i in range(a.n_samples)]
        )
        q = np.concatenate(
            [a.model(twin).rows(i, slice(0, int(s["length"][i]))) for i in range(a.n_samples)]
        )
        groups = np.concatenate([np.full(int(n), i) for i, n in enumerate(s["length"])])
    return K.fit_gamma_pooled(p, q, groups=groups, n_boot=500, seed=0)


def test_typicality_twin_sharpens_more_than_its_coin_flip_control(tmp_path, cache_dir):
    """Strong alpha on tiny-random: on held-out prompts the twin's pooled per-step gamma
    (bootstrap over completions) lies above the alpha = 0 control's interval."""
    train = ["train.epochs=2", "train.learning_rate=3e-5", "beta=0.5", "train.batch_pairs=16"]
    typ = align(tmp_path, cache_dir, "name=tiny-sharp", "alpha=5", *train)
    rnd = align(tmp_path, cache_dir, "name=tiny-coin", "alpha=0", *train)
    assert typ["label_agrees_with_likelihood"] > 0.9
    assert 0.35 < rnd["label_agrees_with_likelihood"] < 0.65
    held = dump_mod.run(
        compose_cfg(
            "dump",
            tmp_path,
            cache_dir,
            [
                "model=tiny-random",
                "prompts=open_ended_heldout",
                "n_samples=2",
                "max_new_tokens=8",
                "codec=fp32",
                f"out={tmp_path}/held.h5",
            ],
        )
    )["archive"]
    for name, r in (("tiny-sharp", typ), ("tiny-coin", rnd)):
        score_mod.run(
            compose_cfg(
                "score",
                tmp_path,
                cache_dir,
                [
                    f"archive={held}",
                    "model=aligned",
                    f"model.name={name}",
                    f"model.build={r['build_id']}",
                ],
            )
        )
    g_typ = pooled_gamma(held, "tiny-random", "tiny-sharp")
    g_rnd = pooled_gamma(held, "tiny-random", "tiny-coin")
    assert g_typ.ci_low > g_rnd.ci_high, (g_typ, g_rnd)
    assert g_typ.gamma > 1
