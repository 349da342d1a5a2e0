"""Analyses on small tiny-random archives, checked against independent float64 computations;
configs composed with Hydra's compose API; one multirun in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from analyses.__main__ import run as run_analysis
from analyses.protocol import CONF
from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.errors import EngineError
from kernels import reference as R
from tests.conftest import ROOT, compose_cfg, compose_dump, tempered_pair


def analysis_cfg(tmp, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "analyses", overrides=[f"paths.output_dir={tmp}", "progress=false", *overrides]
        )


@pytest.fixture(scope="module")
def paired(tmp_path_factory, cache_dir):
    """tiny-random (fp32) + its tempered twin (gamma 1.7): 2 prompts x 4 samples x 12 steps."""
    return tempered_pair(tmp_path_factory.mktemp("paired"), cache_dir, 4, 12)


@pytest.fixture(scope="module")
def other(tmp_path_factory, cache_dir):
    """Another dump of the paired archive's prompts (another seed, temperature 2): a reference
    of the same prompts for the `vs_reference` tests."""
    tmp = tmp_path_factory.mktemp("other")
    overrides = ["model=tiny-random", "n_samples=4", "max_new_tokens=12", "seed=7", "temperature=2"]
    return dump_mod.run(compose_dump(tmp, cache_dir, overrides))["archive"]


def decoded(a, key):
    s = a.samples()
    return [
        a.model(key).rows(i, slice(0, int(s["length"][i]))).astype(np.float64)
        for i in range(a.n_complete)
    ]


def test_entropy_summary_matches_independent_computation(paired, tmp_path):
    res = run_analysis(analysis_cfg(tmp_path, "analysis=entropy", f"archive={paired}"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["models"].keys() == {"tiny-random", "tiny-random-tempered-1.7"}
    with Archive(paired) as a:
        for key in a.models:
            per_comp_top = [R.entropy(rows, base=2, topk=5).mean() for rows in decoded(a, key)]
            per_comp_h = [R.entropy(rows).mean() for rows in decoded(a, key)]
            got = summary["models"][key]
            assert got["top5_entropy_bits"]["mean"] == pytest.approx(
                np.mean(per_comp_top), abs=1e-6
            )
            assert got["top5_entropy_bits"]["std"] == pytest.approx(
                np.std(per_comp_top, ddof=1), abs=1e-6
            )
            assert got["top5_entropy_bits"]["n_completions"] == 8
            assert got["entropy_nats"]["mean"] == pytest.approx(np.mean(per_comp_h), abs=1e-6)
            assert 0 <= got["top5_entropy_bits"]["mean"] <= np.log2(5)
            # the engine's per-step exp(H) by generated step, the mean over completions
            h = [R.entropy(rows) for rows in decoded(a, key)]
            steps = range(max(map(len, h)))
            curve = got["branching_factor_by_position"]
            assert curve["mean"] == pytest.approx(
                [np.mean([np.exp(x[t]) for x in h if len(x) > t]) for t in steps], rel=1e-6
            )
            assert curve["n_completions"] == [sum(len(x) > t for x in h) for t in steps]
    m = summary["models"]
    assert (
        m["tiny-random-tempered-1.7"]["entropy_nats"]["mean"]
        < m["tiny-random"]["entropy_nats"]["mean"]
    )
    # the twin at power 1 is the base at power 1.7 (curves from tempered_entropy)
    curve = summary["entropy_vs_gamma"]
    assert curve["tiny-random-tempered-1.7"]["1.0"] == pytest.approx(
        np.interp(1.7, [1.5, 2.0], [curve["tiny-random"]["1.5"], curve["tiny-random"]["2.0"]]),
        rel=0.05,
    )
    for stem in (
        "top5_entropy_boxplot",
        "per_token_top5_entropy",
        "per_token_top5_probabilities",
        "entropy_vs_gamma",
        "branching_factor_by_position",
    ):
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000 and (
            tmp_path / f"{stem}.svg"
        ).exists()
    assert (tmp_path / "per_step.csv").read_text().count("\n") == 1 + 2 * 8 * 12
    assert res["summary"] == str(tmp_path / "summary.json")


def test_pair_report_matches_independent_computation(paired, tmp_path):
    run_analysis(
        analysis_cfg(tmp_path, "analysis=pair", f"archive={paired}", "analysis.n_boot=300")
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["base"], s["aligned"]) == ("tiny-random", "tiny-random-tempered-1.7")
    with Archive(paired) as a:
        p, q = (
            np.concatenate(decoded(a, "tiny-random")),
            np.concatenate(decoded(a, "tiny-random-tempered-1.7")),
        )
        smp = a.samples()
        toks = np.concatenate(
            [smp["tokens"][i, : int(smp["length"][i])] for i in range(a.n_complete)]
        )
        kl, kl_qp, js, tv, agree, dp = R.pair_stats(p, q, toks)[:6]
        assert s["n_rows"] == len(p) == 96
        assert s["kl_base_aligned"]["mean"] == pytest.approx(kl.mean(), rel=1e-5)
        assert s["kl_base_aligned"]["stderr"] == pytest.approx(
            kl.std(ddof=1) / np.sqrt(96), rel=1e-4
        )
        assert s["kl_base_aligned"]["percentiles"]["50"] == pytest.approx(np.median(kl), rel=1e-4)
        assert s["same_top_p"]["mean"] == 1.0  # tempering keeps the argmax
        assert s["delta_p_sampled"]["mean"] == pytest.approx(dp.mean(), abs=1e-6)
        assert s["token_shift"]["unshifted"] == 1.0
        g = s["gamma"]
        assert g["per_step"]["median"] == pytest.approx(1.7, abs=1e-4)
        assert g["pooled"]["gamma"] == pytest.approx(1.7, abs=1e-4)
        assert g["pooled"]["ci95"][0] <= 1.7 + 1e-4 and g["pooled"]["ci95"][1] >= 1.7 - 1e-4
        assert g["pooled"]["kl_explained"] > 0.999
        assert "lookahead" in g["caveat"]
        # sequence-level gamma: OLS slope of summed token log-probs, computed here independently
        lp_p = R.token_stats(p, toks)[0]
        lp_q = R.token_stats(q, toks)[0]
        sample = np.concatenate([np.full(int(L), i) for i, L in enumerate(smp["length"])])
        for pi, text in enumerate(a.prompts):
            sel = np.flatnonzero(smp["prompt_index"] == pi)
            x = np.array([lp_p[sample == i].sum() for i in sel])
            y = np.array([lp_q[sample == i].sum() for i in sel])
            assert g["sequence_level"][text]["gamma"] == pytest.approx(
                np.polyfit(x, y, 1)[0], rel=1e-6
            )
    for stem in ("kl_by_position", "gamma_histogram", "gamma_by_position_and_entropy"):
        assert (tmp_path / f"{stem}.png").exists() and (tmp_path / f"{stem}.svg").exists()


def test_mitigation_recovers_the_planted_temperature(paired, tmp_path):
    """The twin is the base at power 1.7 token by token, so sampling it at T = 1.7 gives the
    base back: T* (entropy matched), argmin-KL T and the pooled gamma all equal 1.7, the KL
    there is 0; the curve equals a float64 recomputation from the decoded rows."""
    run_analysis(
        analysis_cfg(tmp_path, "analysis=mitigation", f"archive={paired}", "analysis.n_boot=300")
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["base"], s["aligned"]) == ("tiny-random", "tiny-random-tempered-1.7")
    t, k, g = s["t_entropy"], s["t_kl"], s["gamma_pooled"]
    assert t["found"] and t["t"] == pytest.approx(1.7, abs=1e-4)
    assert abs(t["residual_nats"]) < 1e-5 and t["ci95"][0] <= t["t"] <= t["ci95"][1]
    assert k["t"] == pytest.approx(1.7, abs=1e-4) and g["gamma"] == pytest.approx(1.7, abs=1e-4)
    assert k["kl_at_t"] < 1e-7 < k["kl_at_1"]
    assert s["at_temperature"]["t_entropy"]["kl_base_aligned_mean"] < 1e-7
    with Archive(paired) as a:
        p = np.concatenate(decoded(a, "tiny-random"))
        q = np.concatenate(decoded(a, "tiny-random-tempered-1.7"))
    lp = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    assert s["base_entropy_mean"] == pytest.approx(-(np.exp(lp) * lp).sum(1).mean(), rel=1e-6)
    cv = s["curve"]
    assert 1.0 in cv["temperature"] and cv["temperature"] == sorted(cv["temperature"])
    for T, h, kl in zip(
        cv["temperature"], cv["aligned_entropy_mean"], cv["kl_base_aligned_mean"], strict=True
    ):
        lq = q / T - np.logaddexp.reduce(q / T, axis=1, keepdims=True)
        assert h == pytest.approx(-(np.exp(lq) * lq).sum(1).mean(), rel=1e-5, abs=1e-7)
        assert kl == pytest.approx((np.exp(lp) * (lp - lq)).sum(1).mean(), rel=1e-4, abs=1e-6)
    assert (tmp_path / "mitigation_temperature.png").stat().st_size > 1000
    assert (tmp_path / "curve.csv").read_text().count("\n") == 1 + len(cv["temperature"])


@pytest.mark.parametrize("group", ["tiny-random", "tiny-random-tempered-1.7"])
def test_pooled_fits_skip_a_nonfinite_row_in_every_pass(paired, tmp_path, group):
    """A NaN row in either group (another writer's file) is dropped from the paired rows;
    the streamed passes of the pooled fits must drop the same row, not shift the rest."""
    import shutil

    import h5py

    path = tmp_path / "nan.h5"
    shutil.copy(paired, path)
    with h5py.File(path, "r+") as f:
        g = f["models"][group]["logits"]
        row = g[1, 2]
        row[5] = np.nan
        g[1, 2] = row
    for name in ("mitigation", "pair"):
        run_analysis(
            analysis_cfg(
                tmp_path / name, f"analysis={name}", f"archive={path}", "analysis.n_boot=50"
            )
        )
    m = json.loads((tmp_path / "mitigation" / "summary.json").read_text())
    assert m["skipped_nonfinite_rows"] == 1 and m["n_rows"] == 95
    assert m["t_entropy"]["t"] == pytest.approx(1.7, abs=1e-4)
    assert m["gamma_pooled"]["gamma"] == pytest.approx(1.7, abs=1e-4)
    assert all(np.isfinite(m["curve"]["kl_base_aligned_mean"]))
    p = json.loads((tmp_path / "pair" / "summary.json").read_text())
    assert p["skipped_nonfinite_rows"] == 1
    assert p["gamma"]["pooled"]["gamma"] == pytest.approx(1.7, abs=1e-4)


def test_mitigation_says_when_t_star_lies_beyond_the_grid(paired, tmp_path):
    run_analysis(
        analysis_cfg(
            tmp_path,
            "analysis=mitigation",
            f"archive={paired}",
            "analysis.t_max=1.5",
            "analysis.n_boot=50",
        )
    )
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (
        not s["t_entropy"]["found"] and "widen analysis.t_min / t_max" in s["t_entropy"]["reason"]
    )
    assert s["t_kl"]["t"] == pytest.approx(1.7, abs=1e-4)  # the fit is not bound to the grid
    with pytest.raises(EngineError, match="t_min < 1 < analysis.t_max"):
        run_analysis(
            analysis_cfg(tmp_path, "analysis=mitigation", f"archive={paired}", "analysis.t_min=1")
        )


def test_pair_needs_a_scored_archive(tiny_archive, tmp_path):
    with pytest.raises(EngineError, match="scored archive"):
        run_analysis(analysis_cfg(tmp_path, "analysis=pair", f"archive={tiny_archive}"))


def test_multirun_entropy_and_pair_in_a_subprocess(paired, tmp_path):
    """Two jobs in parallel through the joblib launcher config (conf/hydra/launcher/local)."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "analyses",
            "-m",
            "hydra/launcher=local",
            "analysis=entropy,pair",
            f"archive={paired}",
            "progress=false",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    stem = Path(paired).stem  # folders say which archive each job read
    assert [p.parent.name for p in summaries] == [
        f"0_analysis=entropy,archive={stem}",
        f"1_analysis=pair,archive={stem}",
    ]
    # the terminal shows each job's headline numbers and every file it wrote
    assert "pooled gamma 1.7" in res.stdout and "top-5 entropy" in res.stdout, res.stdout
    assert "files: " in res.stdout and "per_step.csv" in res.stdout
    assert json.loads(summaries[1].read_text())["gamma"]["pooled"]["gamma"] == pytest.approx(
        1.7, abs=1e-4
    )


def test_unknown_analysis_is_one_line(tmp_path, tiny_archive):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "analyses",
            "analysis=nope",
            f"archive={tiny_archive}",
            f"hydra.run.dir={tmp_path}/h",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.strip().startswith("error: unknown analysis 'nope'")
    assert len(res.stderr.strip().splitlines()) == 1


def test_analysis_sweeps_are_checked_name_by_name(capsys):
    from analyses.protocol import options
    from engine.cli import check_group_choices

    def check_analysis_choices(args):  # as analyses/__main__.py calls it
        check_group_choices(args, ("analysis",), options)

    check_analysis_choices(["-m", "analysis=entropy,pair", "archive=a.h5,b.h5"])
    check_analysis_choices(["-m", "analysis=glob(p*)", "analysis.seed=1"])
    for bad in (
        "analysis=nope",
        "analysis=entropy,nope",
        "analysis=choice(nope)",
        "analysis=glob(zz*)",
    ):
        with pytest.raises(SystemExit) as exc:
            check_analysis_choices(["-m", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
        assert err.startswith("error: ") and "available: answers, attractor" in err, err


def test_recovery_time_on_planted_series():
    from analyses.attractor import recovery_time, rolling

    assert rolling(np.array([1.0, 2, 3, 4]), 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    h = np.full(30, 2.0)
    p = np.full(30, 0.5)
    p[:7] = 0.01  # low-probability tokens right after the edit, then back in the band
    assert recovery_time(p, h, (0.3, 0.7), (1.0, 3.0), 1) == 7.0
    # window 3: step 7 averages (0.01, 0.01, 0.5) = 0.17, out; step 8 (0.01, 0.5, 0.5) = 0.34, in
    assert recovery_time(p, h, (0.3, 0.7), (1.0, 3.0), 3) == 8.0
    p[-1] = 0.0  # never settles: censored
    assert np.isnan(recovery_time(p, h, (0.3, 0.7), (1.0, 3.0), 1))


def test_attractor_report_on_a_perturb_archive(paired, tmp_path, cache_dir):
    from engine.commands import perturb as perturb_mod

    pcfg = compose_cfg(
        "perturb",
        tmp_path,
        cache_dir,
        [
            f"source={paired}",
            "model=tiny-random",
            "parents=[0]",
            "cut_after=null",
            "cut_at=3",
            "edit.replace=[' was',' was not']",
            "n_samples=3",
            "max_new_tokens=6",
            f"out={tmp_path}/p.h5",
        ],
    )
    path = perturb_mod.run(pcfg)["archive"]
    out = tmp_path / "att"
    run_analysis(analysis_cfg(out, "analysis=attractor", f"archive={path}", "analysis.window=2"))
    s = json.loads((out / "summary.json").read_text())
    (v,) = s["variants"]
    assert (v["prompt"], v["control_prompt"], v["variant"]) == (1, 0, "edit")
    assert v["recovery_time"]["recovered"] + v["recovery_time"]["censored"] == 3
    with Archive(path) as a:
        smp = a.samples()
        n = min(int(smp["length"][3]), int(smp["length"][0]))
        kl = R.pair_stats(
            a.model().rows(3, slice(0, n)).astype(np.float64),
            a.model().rows(0, slice(0, n)).astype(np.float64),
        )[0]
        base = R.pair_stats(
            a.model().rows(0, slice(0, n)).astype(np.float64),
            a.model().rows(1, slice(0, n)).astype(np.float64),
        )[0]
    curve = list(s["trajectory_divergence_by_step"].values())[0]
    assert np.isfinite(curve["0"]) and curve["0"] > 0  # the edit changes the first distribution
    assert list(s["trajectory_divergence_control_vs_control_by_step"].values())[0][
        "0"
    ] == pytest.approx(0, abs=1e-6)
    assert s["influence"] is None and "counterpart=true" in s["influence_note"]
    rows = (out / "per_step.csv").read_text().splitlines()
    first = [r for r in rows[1:] if r.startswith("1,3,0,")]  # prompt 1, sample 3, control 0
    assert [float(r.split(",")[4]) for r in first] == pytest.approx(kl.tolist(), abs=1e-5)
    assert base[0] == pytest.approx(0, abs=1e-9)
    assert "background:rgb(" in (out / "rendering.html").read_text()
    for stem in ("trajectory_divergence", "recovery_time", "probability_heatmap"):
        assert (out / f"{stem}.png").exists() and (out / f"{stem}.svg").exists()


def test_attractor_needs_lineage(tiny_archive, tmp_path):
    with pytest.raises(EngineError, match="perturb"):
        run_analysis(analysis_cfg(tmp_path, "analysis=attractor", f"archive={tiny_archive}"))


def test_distinct_n_and_ead_by_hand():
    from analyses.diversity import distinct_and_ead, pairwise_cos

    seqs = [[1, 2, 3, 1], [1, 2, 4]]
    # unigrams: 1,2,3,1,1,2,4 -> C=7, unique {1,2,3,4}=4; bigrams: (1,2),(2,3),(3,1),(1,2),(2,4) -> C=5, unique 4
    d1, e1 = distinct_and_ead(seqs, 1, V=10)
    assert d1 == pytest.approx(4 / 7) and e1 == pytest.approx(4 / (10 * (1 - 0.9**7)))
    d2, e2 = distinct_and_ead(seqs, 2, V=10)
    assert d2 == pytest.approx(4 / 5) and e2 == pytest.approx(4 / (10 * (1 - 0.9**5)))
    assert np.isnan(distinct_and_ead([[1]], 2, V=10)[0])
    cos = pairwise_cos([[1, 0], [0, 1], [1, 1]])
    assert cos == pytest.approx([0.0, 1 / np.sqrt(2), 1 / np.sqrt(2)])


def test_embeddings_are_unit_and_identical_texts_have_zero_diversity():
    from analyses.diversity import metrics
    from analyses.lib.embeddings import embed

    e = embed(
        [
            "Grace Hopper was a computer scientist.",
            "Grace Hopper was a computer scientist.",
            "I like pizza with olives.",
        ]
    )
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    same = metrics(["a b c", "a b c"], [[1, 2, 3], [1, 2, 3]], e[:2], V=50, max_n=2)
    assert same["sentbert_diversity"] == pytest.approx(0, abs=1e-5)
    assert same["tfidf_cosine"]["mean"] == pytest.approx(1, abs=1e-9)
    assert float(e[0] @ e[2]) < float(e[0] @ e[1])


def test_diversity_report_on_an_archive(paired, tmp_path):
    from analyses.diversity import distinct_and_ead

    run_analysis(analysis_cfg(tmp_path, "analysis=diversity", f"archive={paired}"))
    s = json.loads((tmp_path / "summary.json").read_text())
    with Archive(paired) as a:
        smp = a.samples()
        for p, text in enumerate(a.prompts):
            seqs = [
                smp["tokens"][i, : int(smp["length"][i])]
                for i in np.flatnonzero(smp["prompt_index"] == p)
            ]
            d3, e3 = distinct_and_ead([list(q) for q in seqs], 3, 258)
            assert s["per_input"][text]["distinct_tokens"]["3"] == pytest.approx(d3)
            assert s["per_input"][text]["ead_tokens"]["3"] == pytest.approx(e3)
            assert s["per_input"][text]["n_texts"] == 4
    assert s["cross_input"]["n_texts"] == 2
    # SBERT diversity is 1 - mean pairwise cosine (pairs i < j) of the packaged embedder's
    # vectors: recompute it independently for every input, and the mean over inputs
    from analyses.lib.embeddings import embed
    from analyses.lib.textdiv import (
        compression_ratio,
        homogenization_rougel,
        self_bleu,
        self_repetition_score,
    )

    with Archive(paired) as a:
        smp, text = a.samples(), a.model().text
        per, shaib = [], []
        for p, ptext in enumerate(a.prompts):
            idx = np.flatnonzero(smp["prompt_index"] == p)
            e = embed([text(smp["tokens"][i, : int(smp["length"][i])]) for i in idx]).astype(
                np.float64
            )
            cos = [float(e[i] @ e[j]) for i in range(len(idx)) for j in range(i + 1, len(idx))]
            per.append(1 - np.mean(cos))
            assert s["per_input"][ptext]["sentbert_diversity"] == pytest.approx(per[-1], abs=1e-5)
            texts = [text(smp["tokens"][i, : int(smp["length"][i])]) for i in idx]
            got = s["per_input"][ptext]
            assert got["compression_ratio_gzip_shaib"] == compression_ratio(texts, "gzip")
            assert got["compression_ratio_xz_shaib"] == compression_ratio(texts, "xz")
            assert got["self_repetition_shaib"] == pytest.approx(self_repetition_score(texts))
            assert got["homogenization_rougel_shaib"] == homogenization_rougel(texts)
            assert got["self_bleu_texygen"] == pytest.approx(self_bleu(texts))
            shaib.append(got["self_repetition_shaib"])
    assert s["per_input_mean"]["sentbert_diversity"] == pytest.approx(np.mean(per), abs=1e-5)
    assert s["per_input_mean"]["self_repetition_shaib"] == pytest.approx(np.mean(shaib))
    # intervals: the mean over prompts inside its prompt-bootstrap interval (2 prompts: the
    # interval spans the two values); cross-input draws pick one of each prompt's 4 texts
    ci = s["per_input_mean_ci95"]["self_repetition_shaib"]
    assert ci["n_prompts"] == 2 and min(shaib) <= ci["ci95"][0] <= ci["ci95"][1] <= max(shaib)
    d = s["cross_input_draws"]
    assert d["n_draws"] == 100 and d["n_prompts"] == 2
    lo, hi = d["sentbert_diversity"]["range95"]
    assert lo <= d["sentbert_diversity"]["median"] <= hi
    assert (tmp_path / "tsne_clusters.png").exists() and (tmp_path / "completions.csv").exists()


def test_diversity_against_a_reference_archive(paired, other, tmp_path):
    """Another dump of the same prompts (another seed, temperature 2) as the reference: each
    delta is the mean over prompts of this archive's per-prompt score minus the reference's,
    recomputed here from the two archives' own diversity summaries; against itself every
    delta is 0 and nothing is resolved."""
    run_analysis(analysis_cfg(tmp_path / "b", "analysis=diversity", f"archive={other}"))
    ref = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert ref["temperature"] == 2.0
    run_analysis(
        analysis_cfg(
            tmp_path / "a",
            "analysis=diversity",
            f"archive={paired}",
            f"analysis.reference={other}",
            "analysis.n_boot=200",
        )
    )
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    v = s["vs_reference"]
    assert v["n_prompts"] == 2 and v["archive"] == str(other)
    for k in ("sentbert_diversity", "ead_words_kirk", "compression_ratio_gzip_shaib"):
        d = [s["per_input"][p][k] - ref["per_input"][p][k] for p in s["per_input"]]
        assert v[k]["delta"] == pytest.approx(np.mean(d), abs=1e-6)
        assert min(d) - 1e-9 <= v[k]["ci95"][0] <= v[k]["ci95"][1] <= max(d) + 1e-9
    run_analysis(
        analysis_cfg(
            tmp_path / "c",
            "analysis=diversity",
            f"archive={paired}",
            f"analysis.reference={paired}",
        )
    )
    same = json.loads((tmp_path / "c" / "summary.json").read_text())["vs_reference"]
    assert same["sentbert_diversity"]["delta"] == 0 and not same["sentbert_diversity"]["resolved"]


def test_entropy_against_a_reference_archive(paired, other, tmp_path):
    """Each model on its own completions: the generator's per-prompt mean entropy (float64
    here, from the stored rows) and Yang & Holtzman's BF (as the reference archive's own
    entropy summary reports it) against another dump's, paired by prompt; the interval lies
    within the per-prompt differences; against itself every delta is 0, not resolved."""
    run_analysis(analysis_cfg(tmp_path / "b", "analysis=entropy", f"archive={other}"))
    ref = json.loads((tmp_path / "b" / "summary.json").read_text())["models"]["tiny-random"]
    run_analysis(
        analysis_cfg(
            tmp_path / "a",
            "analysis=entropy",
            f"archive={paired}",
            f"analysis.reference={other}",
            "analysis.n_boot=300",
        )
    )
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    v = s["vs_reference"]
    assert v["archive"] == str(other) and v["model"] == "tiny-random"

    def per_prompt_h(path):
        with Archive(path) as a:
            prompt = a.samples()["prompt_index"][: a.n_complete]
            h = np.array([R.entropy(rows).mean() for rows in decoded(a, a.generator)])
            return {t: h[prompt == p].mean() for p, t in enumerate(a.prompts)}

    mine, theirs = per_prompt_h(paired), per_prompt_h(other)
    d = [mine[p] - theirs[p] for p in mine]
    got = v["entropy_nats"]
    assert got["n_prompts"] == 2 and got["delta"] == pytest.approx(np.mean(d), abs=1e-6)
    assert got["this"] == pytest.approx(np.mean(list(mine.values())), abs=1e-6)
    assert min(d) - 1e-6 <= got["ci95"][0] <= got["ci95"][1] <= max(d) + 1e-6  # float32 rows
    bf = v["branching_factor_yang_holtzman"]
    here = s["models"]["tiny-random"]["branching_factor_yang_holtzman"]["per_prompt"]
    there = ref["branching_factor_yang_holtzman"]["per_prompt"]
    d = [here[p]["bf"] - there[p]["bf"] for p in here]
    assert bf["delta"] == pytest.approx(np.mean(d), rel=1e-9)
    run_analysis(
        analysis_cfg(
            tmp_path / "c",
            "analysis=entropy",
            f"archive={paired}",
            f"analysis.reference={paired}",
        )
    )
    same = json.loads((tmp_path / "c" / "summary.json").read_text())["vs_reference"]
    for k in ("entropy_nats", "branching_factor_yang_holtzman"):
        assert same[k]["delta"] == 0 and same[k]["ci95"] == [0, 0] and not same[k]["resolved"]


def test_paired_over_prompts_by_hand():
    """The delta is the mean of the per-prompt differences over the prompts both sides have
    (non-finite and None skipped); fewer than 2 such prompts give no interval."""
    from analyses.lib.common import paired_over_prompts

    r = paired_over_prompts(
        {"a": 3.0, "b": 1.0, "c": None, "d": 2.0}, {"a": 1.0, "b": 2.0, "c": 5.0}, 500, 0
    )
    assert r["delta"] == pytest.approx(0.5) and r["n_prompts"] == 2
    assert r["this"] == 2.0 and r["reference"] == 1.5
    assert -1.0 <= r["ci95"][0] <= r["ci95"][1] <= 2.0 and not r["resolved"]
    r = paired_over_prompts({"a": 3.0, "b": 4.0}, {"a": 1.0, "b": 1.5}, 500, 0)
    assert r["ci95"][0] >= 2.0 and r["resolved"]
    one = paired_over_prompts({"a": 1.0}, {"a": 0.0}, 500, 0)
    assert one["n_prompts"] == 0 and np.isnan(one["delta"])


def test_pooled_sequence_level_gamma_recovers_a_planted_power():
    """log q(y) = 1.7 log p(y) + c(prompt) + noise over 30 prompts x 6 completions: the
    within-prompt slope recovers 1.7 and its prompt-bootstrap interval covers it; a pooled
    slope that ignored the per-prompt offsets would not (the offsets correlate with p here)."""
    from analyses.pair import sequence_gamma_pooled

    rng = np.random.default_rng(3)
    n_prompts, per, steps = 30, 6, 5
    prompt = np.repeat(np.arange(n_prompts), per)
    offset = rng.normal(0, 5, n_prompts)
    lp_seq = rng.normal(-20, 4, n_prompts * per) + 3 * offset[prompt]
    lq_seq = 1.7 * lp_seq - 2 * offset[prompt] + rng.normal(0, 0.3, lp_seq.size)
    sample = np.repeat(np.arange(lp_seq.size), steps)  # each sequence split into 5 equal steps
    lp_tok, lq_tok = np.repeat(lp_seq / steps, steps), np.repeat(lq_seq / steps, steps)

    class Stub:
        n_complete = lp_seq.size

        def samples(self):
            return {"prompt_index": prompt}

    got = sequence_gamma_pooled(Stub(), lp_tok, lq_tok, sample, n_boot=500, seed=0)
    assert got["gamma"] == pytest.approx(1.7, abs=0.02)
    assert got["ci95"][0] <= 1.7 <= got["ci95"][1] and got["ci95"][1] - got["ci95"][0] < 0.1
    naive = np.polyfit(lp_seq, lq_seq, 1)[0]
    assert abs(naive - 1.7) > 0.2
    assert got["n_prompts"] == n_prompts


def test_kirk_word_level_metrics_follow_the_released_code():
    """Hand-computed on Kirk et al.'s own test strings (diversity_metrics.py __main__)."""
    from analyses.diversity import KIRK_V, kirk_word_metrics, kirk_words

    texts = ["i am going", "i am going", "lets go i i"]
    assert kirk_words("a.b  c\nd") == ["ab", "cd"]  # '.' and newlines deleted, not split on
    # n=1: 10 words, unique {i, am, going, lets, go} = 5; n=2: 6 bigrams, unique 4
    # ((i,am),(am,going),(lets,go),(go,i),(i,i)) -> 5; n=3: 4 trigrams, unique 3; n>=4: 1, 1
    grams = {1: (5, 10), 2: (5, 7), 3: (3, 4), 4: (1, 1), 5: (0, 0)}
    dist = np.mean([u / c if c else 0.0 for u, c in grams.values()])
    ead = np.mean(
        [u / (KIRK_V * (1 - ((KIRK_V - 1) / KIRK_V) ** c)) if c else 0.0 for u, c in grams.values()]
    )
    d, e = kirk_word_metrics(texts)
    assert d == pytest.approx(dist) and e == pytest.approx(ead)
