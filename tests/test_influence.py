"""The edit's influence on identical continuation tokens, on a model whose prefix influence is
known: tiny-random with every attention layer limited to its last W keys (scores of older keys
set to -inf, so they carry no weight at all).  With L = 2 layers a prediction sees the last
2 (W - 1) + 1 = 7 tokens, so I(t) must vanish once the edit has left that window and be
clearly non-zero inside it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses.__main__ import run as run_analysis
from engine.archive import Archive
from engine.commands import dump, perturb, score
from engine.errors import EngineError
from engine.runtime.models import load_model
from engine.runtime.settings import ModelSpec
from kernels import reference as R
from tests.conftest import DEVICE, compose_cfg
from tests.test_analyses import analysis_cfg

W, LAYERS = 4, 2
FIELD = LAYERS * (W - 1) + 1  # tokens a prediction depends on


def windowed(cfg):
    lm = load_model(ModelSpec.from_node(cfg.model), DEVICE)

    def window(scores, hook):  # [batch, heads, queries, keys]: keep the last W keys
        q, k = scores.shape[-2:]
        qpos = torch.arange(k - q, k, device=scores.device)[:, None]
        kpos = torch.arange(k, device=scores.device)[None, :]
        return scores.masked_fill(qpos - kpos >= W, float("-inf"))

    for layer in range(LAYERS):
        lm.bridge.add_hook(f"blocks.{layer}.attn.hook_attn_scores", window, is_permanent=True)
    return lm


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("influence")
    (tmp / "p.txt").write_text("Grace Hopper was\n")
    common = ["model=tiny-random", "codec=fp32"]
    dcfg = compose_cfg(
        "dump",
        tmp,
        cache_dir,
        [
            *common,
            "prompts=file",
            f"prompts.file={tmp}/p.txt",
            "n_samples=2",
            "max_new_tokens=8",
            f"out={tmp}/src.h5",
        ],
    )
    lm = windowed(dcfg)
    src = dump.run(dcfg, model=lm)["archive"]
    # kept completion: 3 tokens after the edit, so at step t the edit lies 4 + t tokens back
    pcfg = compose_cfg(
        "perturb",
        tmp,
        cache_dir,
        [
            *common,
            f"source={src}",
            "parents=[0]",
            "cut_after=null",
            "cut_at=3",
            "edit.replace=[' was',' was not']",
            "n_samples=4",
            "max_new_tokens=12",
            f"out={tmp}/p.h5",
        ],
    )
    path = perturb.run(pcfg, model=lm)["archive"]
    scfg = compose_cfg(
        "score", tmp, cache_dir, ["model=tiny-random", f"archive={path}", "counterpart=true"]
    )
    score.run(scfg, model=lm)
    out = tmp / "att"
    run_analysis(analysis_cfg(out, "analysis=attractor", f"archive={path}", "analysis.window=2"))
    return path, json.loads((out / "summary.json").read_text()), out


def test_influence_vanishes_exactly_where_the_window_ends(planted):
    path, s, out = planted
    infl = s["influence"]
    assert infl["counterpart_group"] == "tiny-random@counterpart" and infl["noise_floor"] == 0.0
    (v,) = infl["variants"].values()
    curve = np.array(v["kl_by_step"])
    with Archive(path) as a:  # tokens the two prefixes share at their end (re-tokenised text)
        c, e = a.model().prompt_tokens(0), a.model().prompt_tokens(1)
    same = next(
        j
        for j in range(min(len(c), len(e)) + 1)
        if j == min(len(c), len(e)) or c[-1 - j] != e[-1 - j]
    )
    inside = FIELD - same  # step t sees the prefixes' last FIELD - t tokens
    assert (curve[:inside] > 1e-3).all(), curve  # the edit is seen
    assert 0 < inside < len(curve)
    assert (np.abs(curve[inside:]) < 1e-6).all(), curve  # ... and forgotten: float32 sums only
    assert v["settle_step_mean_curve"] == inside
    assert v["settle_step"]["censored_share"] == 0.0
    assert np.isfinite(v["half_life_steps"]) or inside < 3
    # Δ log p: each continuation is more likely after the prefix it was sampled from
    assert v["delta_logp_edited_continuations"]["mean"] > 0
    assert v["delta_logp_control_continuations"]["mean"] < 0
    for stem in ("influence", "trajectory_divergence"):
        assert (out / f"{stem}.png").exists()


def test_influence_matches_a_float64_recomputation(planted):
    path, s, _ = planted
    (v,) = s["influence"]["variants"].values()
    with Archive(path) as a:
        smp, M = a.samples(), a.samples_per_prompt
        own, cp = a.model(), a.model("tiny-random@counterpart")
        curves = []
        for i in range(M, 2 * M):  # edited continuations: own rows read the edited prefix
            n = int(smp["length"][i])
            curves.append(
                R.pair_stats(
                    own.rows(i, slice(0, n)).astype(np.float64),
                    cp.rows(i, slice(0, n)).astype(np.float64),
                )[0]
            )
        for i in range(0, M):  # control continuations: the counterpart read the edited prefix
            n = int(smp["length"][i])
            curves.append(
                R.pair_stats(
                    cp.rows(i, slice(0, n)).astype(np.float64),
                    own.rows(i, slice(0, n)).astype(np.float64),
                )[0]
            )
        # the counterpart group read each prompt's partner, token for token
        assert cp.prompt_tokens(0) == own.prompt_tokens(1) and cp.prompt_tokens(
            1
        ) == own.prompt_tokens(0)
    T = max(len(c) for c in curves)
    want = [np.mean([c[t] for c in curves if len(c) > t]) for t in range(T)]
    # the kernels' float32 KL terms resolve 1e-6 nats (analyses.lib.influence.KL_RESOLUTION)
    np.testing.assert_allclose(v["kl_by_step"], want, rtol=1e-5, atol=1e-6)
    assert min(want) < 1e-9  # in float64, past the window I(t) is zero up to KV-cache numerics
    # the area under I(t) per continuation, and its interval over continuations
    areas = v["area"]["values"]
    np.testing.assert_allclose(sorted(areas), sorted(c.sum() for c in curves), rtol=1e-5, atol=1e-5)
    assert v["area"]["n"] == len(curves) and v["area"]["mean"] == pytest.approx(np.mean(areas))
    assert min(areas) <= v["area"]["ci95"][0] <= v["area"]["ci95"][1] <= max(areas)


def test_influence_against_a_reference_by_hand():
    """The difference of mean areas, resampling each model's continuations independently."""
    from analyses.lib.influence import vs_reference

    def summary(values, pairs=None):
        pairs = list(range(len(values))) if pairs is None else pairs
        return {"variants": {"prompt 1 (edit: x)": {"area": {"values": values, "pairs": pairs}}}}

    this, ref = summary([1.0, 2.0, 3.0, 2.0]), summary([10.0, 11.0, 12.0])
    (v,) = vs_reference(this, ref, 500, 0).values()
    a = v["area"]
    assert a["delta"] == pytest.approx(2.0 - 11.0) and (a["n_this"], a["n_reference"]) == (4, 3)
    assert -11.0 <= a["ci95"][0] <= a["delta"] <= a["ci95"][1] <= -7.0 and a["resolved"]
    (v,) = vs_reference(this, this, 500, 0).values()
    assert v["area"]["delta"] == 0 and v["area"]["ci95"][0] < 0 < v["area"]["ci95"][1]
    assert not v["area"]["resolved"]
    assert vs_reference(this, {"variants": {"prompt 2 (edit: y)": {}}}, 500, 0) == {}
    # whole seed pairs are resampled: pair means 2.0 and 2.0, so this side has no spread
    paired = summary([1.0, 3.0, 2.0, 2.0], [0, 0, 1, 1])
    (v,) = vs_reference(paired, summary([5.0, 5.0, 5.0]), 500, 0).values()
    assert v["area"]["ci95"] == [-3.0, -3.0]


def test_area_interval_resamples_seed_pairs():
    """Two continuations of one seed go together: areas (0, 10) and (10, 0) in two pairs have
    pair means 5 and 5, so the mean's interval is a point, where resampling continuations
    would spread it over [0, 10]."""
    from analyses.lib.influence import area_stats

    a = area_stats([0.0, 10.0, 10.0, 0.0], [0, 0, 1, 1], 500, 0)
    assert a["ci95"] == [5.0, 5.0] and a["n_pairs"] == 2 and a["mean"] == 5.0
    assert area_stats([1.0, 2.0], [0, 0], 500, 0)["ci95"] is None  # one pair: no interval


def test_attractor_against_a_reference_archive(planted, tmp_path):
    """analysis.reference: the same variant of another perturbation archive (here the same
    one: every area is the reference's, so the difference is 0 and not resolved)."""
    path, s, _ = planted
    out = tmp_path / "vs"
    run_analysis(
        analysis_cfg(out, "analysis=attractor", f"archive={path}", f"analysis.reference={path}")
    )
    v = json.loads((out / "summary.json").read_text())["vs_reference"]
    assert v["archive"] == str(path) and v["model"] == "tiny-random"
    ((name, d),) = v["variants"].items()
    assert name in s["influence"]["variants"]
    assert d["area"]["delta"] == 0 and not d["area"]["resolved"]
    assert d["area"]["this"] == pytest.approx(s["influence"]["variants"][name]["area"]["mean"])


def test_counterpart_needs_a_perturbation_archive_and_its_generator(
    tiny_archive, tmp_path, cache_dir
):
    cfg = compose_cfg(
        "score",
        tmp_path,
        cache_dir,
        ["model=tiny-random", f"archive={tiny_archive}", "counterpart=true"],
    )
    with pytest.raises(EngineError, match="perturb"):
        score.run(cfg)


def test_without_counterpart_the_summary_says_how_to_get_it(planted, tmp_path, cache_dir):
    import shutil

    import h5py

    path, _, _ = planted
    copy = tmp_path / "nocp.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "r+") as f:
        del f["models"]["tiny-random@counterpart"]
    s = run_analysis(analysis_cfg(tmp_path / "a", "analysis=attractor", f"archive={copy}"))
    assert s["influence"] is None and "counterpart=true" in s["influence_note"]
