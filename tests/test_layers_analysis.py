"""analysis=layers on small synthetic archives (no model): lens and layer-pair groups written
with h5py per docs/archive-format.md (version 6) with planted values, so every expected
number is known; padding and samples beyond a group's n_complete hold garbage (1e9) that must
never be read as data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from analyses.__main__ import run as run_analysis
from analyses.layers import first_half, stem, terminal_lines
from analyses.protocol import CONF
from engine.archive import Archive
from engine.archive import format as F
from tests.conftest import ROOT

BASE, TWIN, CONTROL = "base.v1-x", "twin", "control"
TWIN_PAIR, CONTROL_PAIR = f"{BASE}~{TWIN}", f"{BASE}~{CONTROL}"
#: archive: 8 complete samples, 12 steps; samples 0..6 are the layer-pair groups' (n_complete 7)
LENGTHS = np.array([10, 7, 3, 10, 5, 8, 2, 12])
T_MAX, VOCAB = 12, 4
GARBAGE = 1e9


def analysis_cfg(tmp, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "analyses", overrides=[f"paths.output_dir={tmp}", "progress=false", *overrides]
        )


def valid_mask(n: int) -> np.ndarray:
    """[S, T]: t < length for samples < n."""
    v = np.arange(T_MAX)[None, :] < LENGTHS[:, None]
    v[n:] = False
    return v


def write_archive(path: Path) -> Path:
    """A complete archive of three model groups (fp32 logits, all zero): just what the reader
    checks, nothing of the lens."""
    S = len(LENGTHS)
    with h5py.File(path, "w") as f:
        a = f.attrs
        a["format"], a["format_version"] = F.FORMAT, 6
        a["created"], a["config_yaml"], a["run_key"] = "2025-01-01T00:00:00+00:00", "", "{}"
        a["packages"], a["git_commit"], a["generator"] = "{}", "", BASE
        a["n_prompts"], a["n_samples"], a["samples_per_prompt"] = 2, S, S // 2
        a["max_new_tokens"], a["n_complete"], a["complete"] = T_MAX, S, np.int8(1)
        f.create_dataset(F.PROMPTS, data=np.array(["p0", "p1"], dtype=object), dtype=F.STR)
        s = f.create_group(F.SAMPLES)
        s["prompt_index"] = np.repeat(np.arange(2, dtype=np.int32), S // 2)
        tokens = np.where(valid_mask(S), 1, F.TOKEN_PAD).astype(np.int32)
        s["tokens"], s["length"] = tokens, LENGTHS.astype(np.int32)
        s.create_dataset("finish_reason", data=np.zeros(S, np.uint8), dtype=F.FINISH)
        s["seed"] = np.arange(S, dtype=np.uint64)
        for key in (BASE, TWIN, CONTROL):
            g = f.create_group(f"{F.MODELS}/{key}")
            g.attrs["n_complete"], g.attrs["complete"] = np.int64(S), np.int8(1)
            g.attrs["role"] = "generator" if key == BASE else "scored"
            g.attrs["chat_template"] = False
            g.create_dataset("prompt_text", data=np.array(["p0", "p1"], dtype=object), dtype=F.STR)
            pt = g.create_dataset("prompt_tokens", (2,), dtype=F.VLEN_I32)
            pt[0], pt[1] = np.array([0], np.int32), np.array([1], np.int32)
            g.create_dataset("vocab", data=np.array(list("abcd"), dtype=object), dtype=F.STR)
            g.create_dataset("tokenizer_json", data="", dtype=F.STR)
            lg = g.create_dataset("logits", data=np.zeros((S, T_MAX, VOCAB), np.float32))
            lg.attrs["codec"], lg.attrs["dtype"] = "fp32", "float32"
    return path


def write_lens(f: h5py.File, key: str, layers, n_layers: int, n_complete: int, stats: dict):
    """/models/<key>/lens: `stats[name]` [S, T, L] at the valid rows, GARBAGE elsewhere."""
    g = f[f"{F.MODELS}/{key}"]
    g.attrs["n_complete"] = np.int64(n_complete)
    lens = g.create_group(F.LENS)
    S, L, k = len(LENGTHS), len(layers), 2
    valid = valid_mask(n_complete)[..., None]
    for name, (dtype, tail) in F.LENS_STATS.items():
        shape = (S, T_MAX, L, k) if tail else (S, T_MAX, L)
        x = stats.get(name, np.zeros(shape))
        v = valid[..., None] if tail else valid
        lens[name] = np.where(v, x, GARBAGE).astype(dtype)
    lens.attrs["layers"] = np.asarray(layers, np.int32)
    lens.attrs["n_layers"], lens.attrs["k"] = n_layers, k
    lens.attrs["convention"] = F.LENS_CONVENTION
    lens.attrs[F.LENS_CHECK] = np.array([1e-5, 1e-3])


def write_pair(f, base, aligned, layers_base, layers_aligned, depths, pairing, n, stats):
    g = f.require_group(F.LAYER_PAIRS).create_group(f"{base}{F.LAYER_PAIR_SEP}{aligned}")
    valid = valid_mask(n)[..., None]
    for name in F.LAYER_PAIR_STATS:
        g[name] = np.where(valid, stats[name], GARBAGE).astype(np.float32)
    a = g.attrs
    a["base"], a["aligned"], a["pairing"] = base, aligned, pairing
    a["layers_base"] = np.asarray(layers_base, np.int32)
    a["layers_aligned"] = np.asarray(layers_aligned, np.int32)
    a["depth_base"], a["depth_aligned"] = depths
    a["n_complete"], a["complete"] = n, np.int8(0)
    a["key"] = json.dumps({"base": base, "aligned": aligned})


def planted(path: Path) -> dict:
    """Lens groups on BASE (6 blocks, every one selected) and TWIN (12 blocks, every other one,
    n_complete 7, one NaN row), and two layer-pair groups; returns the planted facts."""
    S, rng = len(LENGTHS), np.random.default_rng(7)
    shape6 = (S, T_MAX, 6)
    l6 = np.arange(6)
    # BASE: constant entropy and log p per layer; KL to final noisy per completion, 0 at the
    # last block; top-1 agrees at block 0, not at 1, and from block 2 on: depth 2 everywhere
    kl_final = np.broadcast_to((5 - l6) * 0.5, shape6) * rng.uniform(0.5, 1.5, (S, 1, 1))
    rank = np.broadcast_to(np.array([1, 7, 1, 1, 1, 1]), shape6)
    base_stats = {
        "entropy": np.broadcast_to(6.0 - l6, shape6),
        "kl_final": kl_final,
        "logp_token": np.broadcast_to(-0.25 * (6 - l6), shape6),
        "rank_final_top": rank,
    }
    # TWIN: blocks 1, 3, ..., 11; even samples agree from block 1 (depth 1), odd ones from block 3
    twin_rank = np.where(
        (np.arange(S) % 2 == 0)[:, None, None], [1, 1, 1, 1, 1, 1], [2, 1, 1, 1, 1, 1]
    )
    twin_rank = np.broadcast_to(twin_rank, shape6)
    twin_kl = np.broadcast_to((5 - l6) * 1.0, shape6).copy()
    twin_kl[1, 2, 0] = np.nan  # one valid row non-finite: left out, counted
    twin_stats = {
        "entropy": np.broadcast_to(3.0 + 0 * l6, shape6),
        "kl_final": twin_kl,
        "rank_final_top": twin_rank,
    }
    # pairs: KL(base_l || aligned_l) = 0.01 (l + 1)^2 (1 + t): half of the last pair's (36)
    # first reached at pair 4 (25 >= 18 > 16), whatever the weights of the steps
    t = np.arange(T_MAX)[None, :, None]
    kl = 0.01 * (l6 + 1.0) ** 2 * (1.0 + t) * np.ones(shape6)
    gamma = np.full(shape6, 1.5)
    gamma[:, 0] = np.nan  # step 0 unidentified
    twin_pair = {
        "kl_base_aligned": kl,
        "kl_aligned_base": 2 * kl,
        "js": np.full(shape6, 0.1),
        "gamma": gamma,
        "kl_at_gamma": np.full(shape6, 0.001),
    }
    noise = rng.uniform(1e-5, 1e-4, shape6)
    control_pair = {
        "kl_base_aligned": noise,
        "kl_aligned_base": noise,
        "js": noise / 4,
        "gamma": 1 + rng.normal(0, 0.01, shape6),
        "kl_at_gamma": noise / 10,
    }
    with h5py.File(path, "a") as f:
        write_lens(f, BASE, range(6), 6, S, base_stats)
        write_lens(f, TWIN, range(1, 12, 2), 12, S - 1, twin_stats)
        write_pair(f, BASE, TWIN, l6, range(1, 12, 2), (6, 12), "relative depth", S - 1, twin_pair)
        write_pair(f, BASE, CONTROL, l6, l6, (6, 6), "layer", S - 1, control_pair)
    return {"kl_final": kl_final, "kl": kl, "twin_rank": twin_rank}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = write_archive(tmp_path_factory.mktemp("layers") / "lens.h5")
    truth = planted(path)
    return path, truth


@pytest.fixture(scope="module")
def result(archive, tmp_path_factory):
    path, _ = archive
    out = tmp_path_factory.mktemp("run")
    res = run_analysis(
        analysis_cfg(out, "analysis=layers", f"archive={path}", "analysis.n_boot=400")
    )
    return out, res, json.loads((out / "summary.json").read_text())


def test_the_reader_sees_the_planted_groups(archive):
    path, _ = archive
    with Archive(path) as a:
        assert a.model(BASE).lens.layers.tolist() == list(range(6))
        assert a.model(CONTROL).lens is None
        assert sorted(a.layer_pairs) == [CONTROL_PAIR, TWIN_PAIR]


def test_lens_curves_ignore_padding_and_constant_data_has_zero_width(archive, result):
    path, truth = archive
    _, _, s = result
    m = s["models"][BASE]
    valid = valid_mask(len(LENGTHS))
    assert m["layers"] == list(range(6)) and m["n_layers"] == 6
    assert m["n_completions"] == 8 and m["n_steps"] == int(LENGTHS.sum())
    assert m["relative_depth"] == pytest.approx((np.arange(6) + 1) / 6)
    assert m["convention"] == "resid_post" and m["check"] == {"max_abs_diff": 1e-5, "bound": 1e-3}
    # constant per layer: exact means, zero-width intervals
    for name, want in (("entropy", 6.0 - np.arange(6)), ("logp_token", -0.25 * (6 - np.arange(6)))):
        assert m[name]["mean"] == pytest.approx(want, abs=1e-12)
        ci = np.array(m[name]["ci95"])
        assert ci[:, 0] == pytest.approx(want, abs=1e-9) and ci[:, 1] == pytest.approx(want)
    assert m["top1_agreement"]["mean"] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    # noisy per completion: the pooled mean over valid steps, inside an interval of nonzero width
    want = truth["kl_final"][valid].mean(0)
    assert m["kl_final"]["mean"] == pytest.approx(want, rel=1e-6)
    ci = np.array(m["kl_final"]["ci95"])
    assert np.all(ci[:5, 0] < want[:5]) and np.all(want[:5] < ci[:5, 1])
    assert ci[-1].tolist() == [0.0, 0.0]  # KL to final is 0 at the last block
    assert m["kl_final"]["n_nonfinite"] == 0
    assert m["kl_final_mid"]["layer"] == 2  # nearest (6 - 1) / 2 = 2.5, the first of two
    assert m["kl_final_mid"]["mean"] == pytest.approx(want[2], rel=1e-6)


def test_prediction_depth_is_the_first_layer_that_stays_on_the_final_top1(archive, result):
    _, truth = archive
    _, _, s = result
    d = s["models"][BASE]["prediction_depth"]
    # block 0 agrees but block 1 does not: depth 2 for every step, exactly
    assert d["mean"] == 2.0 and d["median"] == 2.0 and d["ci95"] == [2.0, 2.0]
    assert d["histogram"] == {
        "layers": list(range(6)),
        "counts": [0, 0, int(LENGTHS.sum()), 0, 0, 0],
    }
    assert d["n_undefined"] == 0 and "stride" in d["note"]
    # TWIN: strided blocks (1, 3, ...), n_complete 7: sample 7 (garbage) is not read
    t = s["models"][TWIN]
    assert t["layers"] == [1, 3, 5, 7, 9, 11] and t["n_completions"] == 7
    steps = LENGTHS[:7]
    even = steps[::2].sum()
    d = t["prediction_depth"]
    assert d["histogram"]["counts"] == [int(even), int(steps.sum() - even), 0, 0, 0, 0]
    assert d["mean"] == pytest.approx((1 * even + 3 * (steps.sum() - even)) / steps.sum())
    assert d["ci95"][0] < d["mean"] < d["ci95"][1]
    assert d["median"] == 3.0  # 20 of 45 steps at block 1
    assert t["kl_final"]["n_nonfinite"] == 1
    assert t["kl_final"]["mean"] == pytest.approx([5, 4, 3, 2, 1, 0])
    assert t["entropy"]["mean"] == pytest.approx([3.0] * 6)


def test_layer_pairs_half_kl_layer_gamma_and_heatmap(archive, result):
    _, truth = archive
    _, _, s = result
    p = s["pairs"][TWIN_PAIR]
    valid = valid_mask(7)
    assert p["pairing"] == "relative depth" and p["n_completions"] == 7
    assert p["n_steps"] == int(LENGTHS[:7].sum())
    want = truth["kl"][valid].mean(0)
    assert p["kl_base_aligned"]["mean"] == pytest.approx(want, rel=1e-6)
    assert p["kl_aligned_base"]["mean"] == pytest.approx(2 * want, rel=1e-6)
    assert p["js"]["mean"] == pytest.approx([0.1] * 6, rel=1e-6)
    h = p["half_kl_layer"]
    assert h["pair"] == 4 and h["pair_ci95"] == [4, 4]
    assert (h["block_base"], h["block_aligned"]) == (4, 9)
    assert h["relative_depth_base"] == pytest.approx(5 / 6)
    assert h["relative_depth_aligned"] == pytest.approx(10 / 12)
    assert h["kl_last"] == pytest.approx(want[-1], rel=1e-6)
    g = p["gamma"]
    assert g["median"] == pytest.approx([1.5] * 6) and g["mean"] == pytest.approx([1.5] * 6)
    assert np.array(g["ci95"]) == pytest.approx(1.5)
    assert g["n_identified"] == [int(LENGTHS[:7].sum()) - 7] * 6  # step 0 unidentified
    assert (
        p["gamma_last"]["median"] == pytest.approx(1.5) and p["gamma_last"]["block_aligned"] == 11
    )
    # heatmap [pair, step]: steps up to the longest of the 7 valid completions (10), exact
    hm = p["heatmap"]
    assert hm["shape"] == [6, 10] and hm["in_summary"]
    mat = np.array(hm["matrix"], dtype=np.float64)
    expect = 0.01 * (np.arange(6)[:, None] + 1.0) ** 2 * (1.0 + np.arange(10)[None, :])
    assert mat == pytest.approx(expect, rel=1e-6)
    # the control beside it, under its own name, from the same base
    c = s["pairs"][CONTROL_PAIR]
    assert c["pairing"] == "layer" and c["layers_aligned"] == list(range(6))
    assert s["pairs_by_base"] == {BASE: [CONTROL_PAIR, TWIN_PAIR]}
    ci = np.array(c["kl_base_aligned"]["ci95"])
    mean = np.array(c["kl_base_aligned"]["mean"])
    assert np.all(ci[:, 0] < mean) and np.all(mean < ci[:, 1]) and np.all(mean < 1e-4)


def test_half_kl_layer_bootstrap_quantiles_by_hand():
    curves = np.array([[1, 2, 3, 4.0], [1, 3, 3, 4.0], [0, 0, 0, 0.0], [5, 1, 1, 2.0]])
    assert first_half(curves).tolist() == [1, 1, -1, 0]


def test_figures_are_written_with_safe_names(result):
    out, res, s = result
    assert stem(TWIN_PAIR) == "base_v1-x__twin"
    for name in (
        "layers_lens_base_v1-x",
        "layers_lens_twin",
        "layers_pairs",
        "layers_heatmap_base_v1-x__twin",
        "layers_heatmap_base_v1-x__control",
    ):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
        assert str(out / f"{name}.png") in s["figures"]
    lines = terminal_lines(res)
    assert len(lines) == 4
    assert lines[0].startswith(f"{BASE}: prediction depth mean block 2.00 [2.00, 2.00]")
    assert "half-KL at pair 4 (blocks 4/9" in lines[3] and "median 1.500" in lines[3]


def test_large_heatmaps_stay_in_the_figure(archive, tmp_path):
    path, _ = archive
    run_analysis(
        analysis_cfg(
            tmp_path,
            "analysis=layers",
            f"archive={path}",
            "analysis.n_boot=10",
            "analysis.heatmap_cells=59",
        )  # fmt: skip
    )
    hm = json.loads((tmp_path / "summary.json").read_text())["pairs"][TWIN_PAIR]["heatmap"]
    assert hm["matrix"] is None and not hm["in_summary"] and hm["shape"] == [6, 10]
    assert (tmp_path / "layers_heatmap_base_v1-x__twin.png").is_file()


def test_an_archive_without_lens_data_is_one_line(tmp_path):
    path = write_archive(tmp_path / "plain.h5")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "analyses",
            f"archive={path}",
            "analysis=layers",
            f"hydra.run.dir={tmp_path}/h",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
    assert err[0].startswith("error: ") and "no logit-lens data" in err[0]
    for hint in ("lens=true", "python -m engine layers"):
        assert hint in err[0], err[0]


def test_report_shows_the_layers_numbers_and_figures(result, tmp_path):
    out, _, s = result
    rep = tmp_path / "report"
    res = run_analysis(
        analysis_cfg(
            rep,
            "analysis=report",
            f"analysis.runs=[{out}]",
            f"analysis.base={BASE}",
            f"analysis.aligned={TWIN}",
        )
    )
    rows = res["rows"]
    depth = next(v for k, v in rows.items() if k.startswith(f"layers: prediction depth of {BASE}"))
    assert depth["base"].startswith("2.00 [2.00, 2.00]") and depth["aligned"] == "–"
    half = next(v for k, v in rows.items() if k.startswith(f"layers, {TWIN_PAIR}:"))
    assert "block 4 / 9" in half["base"] and "1.500" in half["base"]
    assert any(k.startswith(f"layers, {CONTROL_PAIR}:") for k in rows)
    page = (rep / "report.html").read_text()
    assert "layers_pairs.png" in page and "layers_heatmap_base_v1-x__twin.png" in page
