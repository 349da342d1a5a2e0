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
from tests.conftest import compose_cfg

BASE, TWIN = "tiny-random", "tiny-random-tempered-1.7"
CONTROL_KEY = "tiny-random-tempered-1.0"
TEMPERED = ["model=tempered", "model.base=tiny-random", "model.gamma=1.7"]
CONTROL = ["model=tempered", "model.base=tiny-random", "model.gamma=1.0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("report")
    arch = {}
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED)):
        arch[key] = dump_mod.run(
            compose_cfg(
                "dump",
                tmp,
                cache_dir,
                [*model, "n_samples=3", "max_new_tokens=10", "codec=fp32", f"out={tmp}/{key}.h5"],
            )
        )["archive"]
    score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={arch[BASE]}", *TEMPERED]))
    score_mod.run(
        compose_cfg("score", tmp, cache_dir, [f"archive={arch[TWIN]}", "model=tiny-random"])
    )
    # a control: the base at power 1 (identical rows), scored on the base's completions
    score_mod.run(compose_cfg("score", tmp, cache_dir, [f"archive={arch[BASE]}", *CONTROL]))
    for key, model in ((BASE, ["model=tiny-random"]), (TWIN, TEMPERED)):
        arch[key + "-perturb"] = perturb_mod.run(
            compose_cfg(
                "perturb",
                tmp,
                cache_dir,
                [
                    f"source={arch[key]}",
                    *model,
                    "parents=[0]",
                    "cut_after=null",
                    "cut_at=3",
                    "edit.replace=null",
                    "edit.insert=X",
                    "n_samples=3",
                    "max_new_tokens=6",
                    f"out={tmp}/{key}-perturb.h5",
                ],
            )
        )["archive"]
    sweep = tmp / "analyses"
    for i, (analysis, archive, extra) in enumerate(
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
        ]
    ):
        run_analysis(
            compose_cfg(
                "analyses",
                sweep / f"{i}_{analysis}",
                cache_dir,
                [f"analysis={analysis}", f"archive={archive}", *extra],
            )
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
    eff = res["effects"]
    rows = {k.split(" [95% CI]")[0]: v for k, v in eff.items()}
    ent = rows["full entropy per step, nats: model − base (mean over completions)"]
    assert ent["verdict"] == "resolved" and ent["effect"].startswith("-")
    nums = [float(x) for x in re.findall(r"-?\d+\.\d+", ent["noise"].split(": ", 1)[1])]
    assert ent["noise"].startswith(f"{CONTROL_KEY}: ") and max(map(abs, nums)) < 1e-4
    g = rows["pooled per-step γ (model ∝ base^γ)"]
    assert g["effect"].startswith("1.7000") and g["noise"].startswith(f"{CONTROL_KEY}: 1.0000")
    assert g["verdict"] == "resolved"
    assert rows[f"KL({BASE} ‖ model) per step, nats"]["noise"] == "no control analysed"
    assert "Effect against noise" in page and rep["effects"] == [list(r) for r in eff_rows(eff)]
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
