"""analysis=report on a tiny-random base/twin pair: every image it references exists and
every number it shows is the one in the summary it cites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyses.__main__ import run as run_analysis
from engine.commands import dump as dump_mod
from engine.commands import perturb as perturb_mod
from engine.commands import score as score_mod
from engine.errors import EngineError
from tests.conftest import compose_cfg, tiny_answers

BASE, TWIN = "tiny-random", "tiny-random-tempered-1.7"
CONTROL_KEY = "tiny-random-tempered-1.0"
TEMPERED = ["model=tempered", "model.base=tiny-random", "model.gamma=1.7"]
CONTROL = ["model=tempered", "model.base=tiny-random", "model.gamma=1.0"]


def dump(tmp, cache_dir, key: str, model: list[str], n_samples: int) -> str:
    """A tiny fp32 dump of the seed prompts, 10 tokens per completion, at tmp/<key>.h5."""
    overrides = [*model, f"n_samples={n_samples}", "max_new_tokens=10", "codec=fp32"]
    cfg = compose_cfg("dump", tmp, cache_dir, [*overrides, f"out={tmp}/{key}.h5"])
    return dump_mod.run(cfg)["archive"]


def perturb(tmp, cache_dir, source: str, model: list[str], key: str, edit: list[str]) -> str:
    """3 continuations of 6 tokens after the first sample cut at step 3, edited by `edit`."""
    overrides = [f"source={source}", *model, "parents=[0]", "cut_after=null", "cut_at=3", *edit]
    overrides += ["n_samples=3", "max_new_tokens=6", f"out={tmp}/{key}-perturb.h5"]
    return perturb_mod.run(compose_cfg("perturb", tmp, cache_dir, overrides))["archive"]


def run_all(sweep, cache_dir, jobs) -> None:
    """Each (analysis, archive, overrides) into sweep/<i>_<analysis>, as a multirun lays out."""
    for i, (analysis, archive, extra) in enumerate(jobs):
        overrides = [f"analysis={analysis}", f"archive={archive}", *extra]
        run_analysis(compose_cfg("analyses", sweep / f"{i}_{analysis}", cache_dir, overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("report")
    arch = {}
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED)):
        arch[key] = dump(tmp, cache_dir, key, model, 3)
    score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={arch[BASE]}", *TEMPERED]))
    score_mod.run(
        compose_cfg("score", tmp, cache_dir, [f"archive={arch[TWIN]}", "model=tiny-random"])
    )
    # a control: the base at power 1 (identical rows), scored on the base's completions
    score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={arch[BASE]}", *CONTROL]))
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED)):
        edit = ["edit.replace=null", "edit.insert=X"]
        arch[key + "-perturb"] = perturb(tmp, cache_dir, arch[key], model, key, edit)
    sweep = tmp / "analyses"
    run_all(
        sweep,
        cache_dir,
        [
            ("entropy", arch[BASE], []),
            ("entropy", arch[TWIN], []),
            ("pair", arch[BASE], [f"analysis.base={BASE}", f"analysis.aligned={TWIN}"]),
            ("pair", arch[TWIN], [f"analysis.base={BASE}", f"analysis.aligned={TWIN}"]),
            ("mitigation", arch[BASE], [f"analysis.base={BASE}", f"analysis.aligned={TWIN}"]),
            ("mitigation", arch[TWIN], [f"analysis.base={BASE}", f"analysis.aligned={TWIN}"]),
            (
                "mitigation",
                arch[BASE],
                [f"analysis.base={BASE}", "analysis.aligned=" + CONTROL_KEY],
            ),
            ("diversity", arch[BASE], []),
            ("attractor", arch[BASE + "-perturb"], []),
            ("attractor", arch[TWIN + "-perturb"], []),
        ],
    )
    return tmp, sweep


def test_report_numbers_and_images_come_from_the_summaries(runs, cache_dir):
    tmp, sweep = runs
    out = tmp / "report"
    res = run_analysis(
        compose_cfg("analyses", out, cache_dir, ["analysis=report", f"analysis.runs=[{sweep}]"])
    )
    assert res["base"] == BASE and res["aligned"] == TWIN and res["n_sources"] == 10
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["cited"]) >= 20
    for c in rep["cited"]:  # every number is the one in the summary it names
        v = json.loads(Path(c["file"]).read_text())
        for k in c["path"]:
            v = v[k]
        assert v == c["value"], c
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    import re

    images = re.findall(r"<img src='([^']+)'", page)
    assert len(images) >= 6 and len(images) == len(rep["images"])
    for src in images:
        assert (out / src).is_file(), src
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
    # the headline numbers, as shown, from the summaries: top-5 entropy of each model on its
    # own completions, and the planted gamma 1.7 recovered by the pooled per-step fit
    for key in (BASE, TWIN):
        ent = next(
            json.loads(p.read_text())
            for p in sweep.rglob("summary.json")
            if json.loads(p.read_text())["analysis"] == "entropy"
            and json.loads(p.read_text())["generator"] == key
        )
        assert f"{ent['models'][key]['top5_entropy_bits']['mean']:.3f}" in page
    row = res["rows"]["pooled per-step γ [95% CI], on the completions of each model"]
    assert row["base"].startswith("1.70") and row["aligned"].startswith("1.70")
    assert "attractor_curves.png" in " ".join(images)
    # the twin is the base at power 1.7: T* = 1.7 on either model's completions
    row = res["rows"][
        "mitigation: T* at which the aligned model's mean entropy per step equals the base's, "
        "on the completions of each model [95% CI]"
    ]
    assert row["base"].startswith("1.700") and row["aligned"].startswith("1.700")
    assert page.count("mitigation_temperature.png") == 2
    # the control's row beside them: identical rows, so T* = 1
    row = res["rows"][
        f"mitigation, {CONTROL_KEY} (the control when α = 0): T* and argmin-KL T on the "
        "completions of each model [95% CI]"
    ]
    assert row["base"].startswith("T* 1.000") and row["aligned"] == "–"
    row = res["rows"][
        "homogenization, ROUGE-L (Shaib et al.'s code; higher = more alike), per input "
        "[95% CI over prompts]"
    ]
    assert "[" in row["base"] and row["aligned"] == "–"  # the twin's diversity was not run
    # "Did alignment sharpen the model?": three sentences, numbers from the base's mitigation
    # summaries (the twin's and the control's), verdicts from their intervals
    mit = {
        s["aligned"]: s
        for s in (json.loads(p.read_text()) for p in sweep.rglob("summary.json"))
        if s["analysis"] == "mitigation" and s["generator"] == BASE
    }
    said = res["answer"]
    assert len(said) == 3 and rep["answer"] == said and "Did alignment sharpen the model?" in page
    assert f"{mit[TWIN]['aligned_entropy_mean']:.3f} nats per step against" in said[0]
    assert f"against {mit[TWIN]['base_entropy_mean']:.3f} for {BASE}" in said[0]
    assert f"γ = {mit[TWIN]['gamma_pooled']['gamma']:.4f} [" in said[1]
    assert said[1].split(";")[0].endswith("resolved: above 1")  # planted 1.7
    gc = mit[CONTROL_KEY]["gamma_pooled"]
    assert f"{CONTROL_KEY} (control): γ = {gc['gamma']:.4f}" in said[1]
    assert said[1].rstrip(".").endswith("not resolved: the interval holds 1")  # planted 1.0
    assert f"T* = {mit[TWIN]['t_entropy']['t']:.4f}" in said[2]
    # effect against noise on the base's completions: the twin (power 1.7) beside the control
    # (power 1.0: identical rows, so its differences are 0 and its gamma and T* are 1)
    assert list(res["effects"]) == [""]  # one table: no held-out runs, no label given
    eff = res["effects"][""]
    rows = {k.split(" [95% CI]")[0]: v for k, v in eff.items()}
    ent = rows["full entropy per step, nats: model − base (mean over completions)"]
    assert ent["verdict"] == "resolved" and ent["effect"].startswith("-")
    nums = [float(x) for x in re.findall(r"-?\d+\.\d+", ent["noise"].split(": ", 1)[1])]
    assert ent["noise"].startswith(f"{CONTROL_KEY}: ") and max(map(abs, nums)) < 1e-4
    g = rows["pooled per-step γ (model ∝ base^γ)"]
    assert g["effect"].startswith("1.7000") and g["noise"].startswith(f"{CONTROL_KEY}: 1.0000")
    assert g["verdict"] == "resolved"
    assert rows[f"KL({BASE} ‖ model) per step, nats"]["noise"] == "no control analysed"
    assert "Effect against noise" in page
    assert rep["effects"] == [{"where": "", "rows": [list(r) for r in eff_rows(eff)]}]
    # the story figure, from the summaries: exp(H) by position with its bands for every model
    # scored on the base's completions (base, twin, control), KL by position for the twin
    assert "story.png" in " ".join(images) and "story.png" in md
    on_base = [c for c in rep["cited"] if "branching_factor_by_position" in c["path"]]
    assert {c["path"][1] for c in on_base} == {BASE, TWIN, CONTROL_KEY}
    for c in on_base:
        bands, mean = c["value"]["ci95"], c["value"]["mean"]
        assert len(bands) == len(mean) == 10
        assert all(lo <= m <= hi for (lo, hi), m in zip(bands, mean) if lo is not None)
    assert any(c["path"] == ["kl_by_position_ci95"] for c in rep["cited"])
    # the token explorer: a page per model's own completions (the other model beside it) and
    # per perturbation archive (no counterpart scored here: the generator alone), linked
    pages = {(p["kind"], p["generator"]): p for p in rep["explorer"]}
    assert set(pages) == {(k, m) for k in ("completions", "perturbation") for m in (BASE, TWIN)}
    assert pages["completions", BASE]["models"] == [BASE, TWIN]
    assert pages["completions", TWIN]["models"] == [TWIN, BASE]
    assert (
        pages["perturbation", BASE]["models"] == [BASE]
        and pages["perturbation", BASE]["samples"] == 4
    )
    for p in pages.values():
        name = Path(p["out"]).name
        assert (out / name).is_file() and f"href='{name}'" in page and f"]({name})" in md
        assert (out / name).stat().st_size == p["bytes"] < 2**20


@pytest.fixture(scope="module")
def heldout(runs, cache_dir):
    """A second experiment as `make demo` runs on the held-out prompts: the base's own
    completions with the twin and the control scored there (entropy, pair, mitigation), and
    each model's own completions against the base's (entropy and diversity with
    analysis.reference).  The control is the base at power 1: its own dump samples the base's
    tokens exactly, so every own-completion delta of the control is 0."""
    tmp, _ = runs
    tmp = tmp / "heldout"
    arch = {}
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED), (CONTROL_KEY, CONTROL)):
        # 4 completions per prompt: Yang & Holtzman's BF pools positions 4 samples reach
        arch[key] = dump(tmp, cache_dir, key, model, 4)
    for model in (TEMPERED, CONTROL):
        score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={arch[BASE]}", *model]))
    base, twin, ctrl = arch[BASE], arch[TWIN], arch[CONTROL_KEY]
    answers = tiny_answers(tmp, cache_dir, tmp / "answers.h5")
    for model in (TEMPERED, CONTROL):
        score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={answers}", *model]))
    pert = {}
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED), (CONTROL_KEY, CONTROL)):
        edit = ["edit.replace=[' was',' was not']"]
        pert[key] = perturb(tmp, cache_dir, arch[key], model, key, edit)
        score_mod.run(
            compose_cfg(
                "score", tmp, cache_dir, [f"archive={pert[key]}", *model, "counterpart=true"]
            )
        )
    sweep = tmp / "analyses"
    pairs = [f"analysis.base={BASE}", f"analysis.aligned={TWIN}"]
    controls = [f"analysis.base={BASE}", f"analysis.aligned={CONTROL_KEY}"]
    ref = [f"analysis.reference={base}", "analysis.n_boot=200"]
    run_all(
        sweep,
        cache_dir,
        [
            ("entropy", base, []),
            ("entropy", twin, ref),
            ("entropy", ctrl, ref),
            ("diversity", twin, ref),
            ("diversity", ctrl, ref),
            ("pair", base, pairs),
            ("pair", base, controls),
            ("mitigation", base, pairs),
            ("mitigation", base, controls),
            ("answers", answers, []),
            ("attractor", pert[BASE], []),
            ("attractor", pert[TWIN], [f"analysis.reference={pert[BASE]}"]),
            ("attractor", pert[CONTROL_KEY], [f"analysis.reference={pert[BASE]}"]),
        ],
    )
    return sweep


def test_report_with_a_heldout_experiment(runs, heldout, cache_dir):
    """With analysis.heldout, the first section, the first effect table and the story come
    from the held-out runs, the seed runs' table follows, and every number is its summary's.
    The own-completion rows (entropy, Yang & Holtzman's BF, diversity) show the twin's delta
    against the base's own completions beside the control's, which is exactly 0."""
    tmp, sweep = runs
    out = tmp / "report-heldout"
    res = run_analysis(
        compose_cfg(
            "analyses",
            out,
            cache_dir,
            [
                "analysis=report",
                f"analysis.runs=[{sweep}]",
                "analysis.runs_label=on the seed prompts",
                f"analysis.heldout=[{heldout}]",
            ],
        )
    )
    rep = json.loads((out / "report.json").read_text())
    for c in rep["cited"]:
        v = json.loads(Path(c["file"]).read_text())
        for k in c["path"]:
            v = v[k]
        assert v == c["value"], c
    assert any(str(heldout) in c["file"] for c in rep["cited"])
    assert list(res["effects"]) == ["on the held-out chat prompts", "on the seed prompts"]
    assert [e["where"] for e in rep["effects"]] == list(res["effects"])
    page = (out / "report.html").read_text()
    held = res["effects"]["on the held-out chat prompts"]
    own = {
        json.loads(p.read_text())["generator"]: json.loads(p.read_text())
        for p in heldout.glob("*_entropy/summary.json")
    }
    for label, key in (
        ("full entropy per step, nats", "entropy_nats"),
        ("branching factor (Yang & Holtzman's code)", "branching_factor_yang_holtzman"),
    ):
        row = next(v for k, v in held.items() if k.startswith(label + ": model − base (each"))
        twin = own[TWIN]["vs_reference"][key]
        digits = 3 if "branching" in label else 4
        assert row["effect"] == f"{twin['delta']:.{digits}f} [{twin['ci95'][0]:.{digits}f}, " + (
            f"{twin['ci95'][1]:.{digits}f}]"
        )
        zero = own[CONTROL_KEY]["vs_reference"][key]
        assert zero["delta"] == 0 and zero["ci95"] == [0, 0] and not zero["resolved"]
        assert twin["n_prompts"] == zero["n_prompts"] == 2
        assert row["noise"].startswith(f"{CONTROL_KEY}: ")
        assert f"{row['effect']}" in page
    assert any(k.startswith("SBERT diversity per input") for k in held)
    assert any(k.startswith("sequence-level γ, within-prompt slope") for k in held)
    # the exact answer distribution: no interval; the control (the base at power 1) has the
    # base's distribution exactly, so its differences are 0 and its gamma 1
    ans = json.loads(next(heldout.glob("*_answers/summary.json")).read_text())
    exact = {k: v for k, v in held.items() if "(exact, no interval)" in k}
    assert len(exact) == 3  # no KL to a reference: these candidates have none
    assert not any("KL(reference" in k for k in exact)
    row = next(v for k, v in exact.items() if "entropy over the candidates" in k)
    d = ans["models"][TWIN]["entropy_nats"] - ans["models"][BASE]["entropy_nats"]
    assert row["effect"] == f"{d:+.3f}" and row["noise"] == f"{CONTROL_KEY}: +0.000"
    assert row["verdict"] == "resolved (exact: beyond every control's difference)"
    row = next(v for k, v in exact.items() if "sequence-level γ over the candidates, exact" in k)
    assert row["noise"] == f"{CONTROL_KEY}: 1.000"
    # the attractor: the area under the edit's influence, each model's own continuations; the
    # control's are the base's exactly (difference 0)
    att = {
        json.loads(p.read_text())["generator"]: json.loads(p.read_text())
        for p in heldout.glob("*_attractor/summary.json")
    }
    row = next(v for k, v in held.items() if k.startswith("attractor, prompt 1 (edit: "))
    ((name, d),) = att[TWIN]["vs_reference"]["variants"].items()
    assert row["effect"] == (
        f"{d['area']['delta']:.3f} [{d['area']['ci95'][0]:.3f}, {d['area']['ci95'][1]:.3f}]"
    )
    zero = att[CONTROL_KEY]["vs_reference"]["variants"][name]["area"]
    assert zero["delta"] == 0 and row["noise"].startswith(f"{CONTROL_KEY}: 0.000 [")
    seeds = res["effects"]["on the seed prompts"]
    assert not any("own completions" in k for k in seeds)  # no own-sample runs there
    said = res["answer"]
    assert said[0].startswith(f"On 8 completions of {BASE} on the held-out chat prompts")
    assert page.index("on the held-out chat prompts") < page.index("on the seed prompts")
    story = next(c for c in rep["cited"] if "branching_factor_by_position" in c["path"])
    assert str(heldout) in story["file"]  # the story figure is drawn from the held-out runs
    assert "completions on the held-out chat prompts, from the summaries" in page
    kinds = {(p["kind"], p["generator"], p["where"]) for p in rep["explorer"]}
    assert ("completions", BASE, "on the held-out chat prompts") in kinds
    assert ("answers", BASE, "on the held-out chat prompts") in kinds
    for p in rep["explorer"]:
        assert (out / Path(p["out"]).name).is_file()


def eff_rows(eff: dict) -> list[tuple]:
    return [(k, v["effect"], v["noise"], v["verdict"]) for k, v in eff.items()]


def test_report_without_summaries_is_one_clear_error(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="no summary.json"):
        run_analysis(
            compose_cfg(
                "analyses",
                tmp_path / "r",
                cache_dir,
                ["analysis=report", f"analysis.runs=[{tmp_path / 'empty'}]"],
            )
        )


def test_effect_verdict_by_hand():
    """Resolved only when the effect's interval excludes the null and lies farther from it
    than every control's whole interval, whichever side the control fell on."""
    from analyses.report import effect_verdict

    e = (-0.3, [-0.33, -0.29])
    assert effect_verdict(e, [(-0.01, [-0.02, 0.004])], 0.0) == "resolved"
    assert effect_verdict(e, [(0.2, [0.1, 0.35])], 0.0) == "not resolved"  # noise reaches 0.35
    assert effect_verdict(e, [(3.2, [2.4, 4.3])], 0.0) == "not resolved"  # no overlap, yet noise
    assert effect_verdict((0.1, [-0.1, 0.3]), [], 0.0) == "not resolved"  # holds the null
    assert effect_verdict(e, [], 0.0) == "resolved against 0 (no control)"
    g = (1.063, [1.059, 1.067])
    assert effect_verdict(g, [(0.9985, [0.9963, 1.0007])], 1.0) == "resolved"
    assert effect_verdict(g, [(0.93, [0.92, 0.94])], 1.0) == "not resolved"  # 0.08 below 1
    kl = (0.042, [0.037, 0.047])  # no null: measured from 0
    assert effect_verdict(kl, [(0.014, [0.0125, 0.0163])], None) == "resolved"
    assert effect_verdict(kl, [(0.04, [0.03, 0.05])], None) == "not resolved"
    assert effect_verdict(kl, [], None) == "no control"
    assert effect_verdict(None, [], 0.0) == "–"
