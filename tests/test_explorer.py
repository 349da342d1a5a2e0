"""`python -m engine inspect ARCHIVE --html OUT`: the token explorer page.

The numbers the page embeds are the kernels' on the rows the reader gives, and its top-k are
`inspect --step`'s; the CLI writes the page once and reports bad input in one line; archives
of every kind render; and in a real browser (headless Chromium driven by Playwright) hovering a
token, switching the measure and the arrow keys do what the README says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kernels as K
from engine import explorer
from engine.archive import Archive
from engine.commands import inspect as inspect_mod
from engine.commands import perturb as perturb_mod
from tests.conftest import ROOT, compose_cfg, engine_cli, tempered_pair, tiny_answers
from tests.test_cli import assert_one_line_error
from tests.test_layers import NO_TORCH

DATA = re.compile(r'<script type="application/json" id="data">(.*?)</script>', re.S)
BASE, TWIN = "tiny-random", "tiny-random-tempered-1.7"


@pytest.fixture(scope="module")
def pair_archive(tmp_path_factory, cache_dir) -> Path:
    """tiny-random (fp32) + its tempered twin (gamma 1.7): 2 prompts x 2 samples x 10 steps."""
    return tempered_pair(tmp_path_factory.mktemp("explorer"), cache_dir, 2, 10)


def embedded(page: Path) -> dict:
    """The JSON the page embeds (what its script shows)."""
    m = DATA.search(page.read_text(encoding="utf-8"))
    assert m, "no embedded data"
    return json.loads(m.group(1))


def inspect_topk(a: Archive, key: str, sample: int, step: int, k: int) -> dict:
    """`inspect --sample S --step T --topk K`'s numbers, read from its printed text."""
    text = inspect_mod.topk(a, a.model(key), sample, step, k)
    rows = re.findall(r"^\s+\d+\s+p=([\d.]+)\s+logp=\s*(\S+)\s+id\s+(\d+)", text, re.M)
    sampled = re.search(r"^sampled .* p=([\d.]+) rank (\d+)$", text, re.M)
    return {
        "p": [float(p) for p, _, _ in rows],
        "logp": [float(lp) for _, lp, _ in rows],
        "ids": [int(i) for _, _, i in rows],
        "entropy": float(re.search(r"entropy ([\d.]+) nats", text).group(1)),
        "token_p": float(sampled.group(1)),
        "token_rank": int(sampled.group(2)),
    }


def close(got, want, tol=1e-5):
    got = np.array([np.nan if v is None else v for v in np.ravel(got)], dtype=np.float64)
    np.testing.assert_allclose(got, np.ravel(want), rtol=tol, atol=1e-9)


# ---- the embedded numbers --------------------------------------------------------------------
def test_embedded_numbers_are_the_kernels(tiny_archive, pair_archive, tmp_path):
    for path, models in ((tiny_archive, [BASE]), (pair_archive, [BASE, TWIN])):
        out = tmp_path / f"{path.stem}-{len(models)}.html"
        with Archive(path) as a:
            res = explorer.write(a, out, topk=5)
            data = embedded(out)
            s = a.samples()
            assert res["samples"] == len(data["samples"]) == a.n_complete  # all of < 32
            assert [m["key"] for m in data["models"]] == models
            assert [m["role"] for m in data["models"]] == ["base", "aligned"][: len(models)]
            want = ["p", "entropy"] + (["kl", "dlogp", "shift"] if len(models) == 2 else [])
            assert [m["id"] for m in data["measures"]] == want
            for d in data["samples"]:
                i, n = d["sample"], int(s["length"][d["sample"]])
                toks = s["tokens"][i, :n]
                assert d["tokens"] == toks.tolist() and d["prompt"] == s["prompt_index"][i]
                rows = {k: a.model(k).rows(i, slice(0, n)) for k in models}
                for k in models:
                    r, lp = d["models"][k], K.log_softmax(rows[k])
                    top = np.argsort(-lp, axis=-1, kind="stable")[:, :5]
                    assert r["top"] == top.tolist()
                    close(r["logp"], np.take_along_axis(lp, top, -1))
                    close(r["p"], np.exp(np.take_along_axis(lp, top, -1)))
                    close(r["entropy"], K.entropy(rows[k]))
                    st = K.token_stats(rows[k], toks)
                    close(r["token_logp"], st.logprob)
                    close(r["token_p"], np.exp(st.logprob))
                    assert r["token_rank"] == st.rank.tolist()
                    pieces = data["pieces"][k]
                    text = a.model(k).text
                    assert all(pieces[str(t)] == text.piece(t) for row in r["top"] for t in row)
                m, p = d["measures"], np.exp(K.token_stats(rows[BASE], toks).logprob)
                close(m["p"], p)
                assert d["mean_p"] == pytest.approx(p.mean(), rel=1e-5)
                close(m["entropy"], K.entropy(rows[BASE]))
                if len(models) == 2:
                    ps = K.pair_stats(rows[BASE], rows[TWIN], toks)
                    close(m["kl"], ps.kl_pq)
                    close(m["dlogp"], ps.logq_token - ps.logp_token)
                    assert m["shift"] == ps.q_top_rank_in_p.astype(int).tolist()
                    # a tempered twin keeps the argmax: every step unshifted, and KL > 0
                    assert set(m["shift"]) == {1} and min(m["kl"]) > 0


def test_topk_equals_inspect(pair_archive, tmp_path):
    """Every step's top-k, entropy and sampled token of both models, as `inspect --step`
    prints them (to its 4 decimals)."""
    out = tmp_path / "page.html"
    with Archive(pair_archive) as a:
        explorer.write(a, out, samples="1,3", topk=7)
        data = embedded(out)
        assert [d["sample"] for d in data["samples"]] == [1, 3]
        for d in data["samples"]:
            for t in range(len(d["tokens"])):
                for key in (BASE, TWIN):
                    want, r = inspect_topk(a, key, d["sample"], t, 7), d["models"][key]
                    assert r["top"][t] == want["ids"]
                    assert np.allclose(r["p"][t], want["p"], atol=1e-4)
                    assert np.allclose(r["logp"][t], want["logp"], atol=1e-4)
                    assert r["entropy"][t] == pytest.approx(want["entropy"], abs=1e-4)
                    assert r["token_p"][t] == pytest.approx(want["token_p"], abs=1e-4)
                    assert r["token_rank"][t] == want["token_rank"]


# ---- the command line ----------------------------------------------------------------------------
def test_cli_writes_the_page_without_torch_and_refuses_bad_input(pair_archive, tmp_path):
    out = tmp_path / "x.html"
    argv = ["engine", "inspect", str(pair_archive), "--html", str(out), "--topk", "3"]
    res = subprocess.run(  # this checkout's engine (cwd), as `python -m engine` runs it
        [sys.executable, "-c", NO_TORCH.format(argv=argv, module="engine")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "TORCH_LOADED=False" in res.stdout and f"wrote {out}" in res.stdout, res.stdout
    data = embedded(out)
    assert len(data["samples"]) == 4 and data["topk"] == 3  # default: the first 32 (of 4)
    assert len(data["samples"][0]["models"][TWIN]["top"][0]) == 3
    html = out.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "no network"
    assert "<link" not in html and html.count("<script") == 2  # inline style and script only
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns

    # an existing page is replaced only with --overwrite; nothing else is written
    assert_one_line_error(
        engine_cli("inspect", str(pair_archive), "--html", str(out)), "pass --overwrite"
    )
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html"]
    res = engine_cli(
        "inspect", str(pair_archive), "--html", str(out), "--overwrite", "--samples", "2"
    )
    assert res.returncode == 0, res.stderr
    assert [d["sample"] for d in embedded(out)["samples"]] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html"]  # no temporary left

    fresh = tmp_path / "y.html"
    for args, needle in (
        (["--samples", "0,9"], "sample 9 out of range (0..3)"),
        (["--samples", "2-1"], "runs backwards"),
        (["--sample", "7"], "out of range"),
        (["--aligned", "nope"], "has no model 'nope'"),
        (["--aligned", BASE], "is the base model"),
        (["--topk", "0"], "--topk must be >= 1"),
    ):
        res = engine_cli("inspect", str(pair_archive), "--html", str(fresh), *args)
        assert_one_line_error(res, needle)
        assert not fresh.exists()
    assert_one_line_error(
        engine_cli("inspect", str(pair_archive), "--html", str(pair_archive), "--overwrite"),
        "is the archive itself",
    )


@pytest.fixture(scope="module")
def pert_and_answers(pair_archive, tmp_path_factory, cache_dir):
    """A perturbation archive of the pair archive's first sample (edited and control prefixes,
    2 continuations each) and a candidate-answer archive of three candidates."""
    tmp_path = tmp_path_factory.mktemp("views")
    pert = perturb_mod.run(
        compose_cfg(
            "perturb",
            tmp_path,
            cache_dir,
            [
                f"source={pair_archive}",
                "model=tiny-random",
                "parents=[0]",
                "cut_after=null",
                "cut_at=3",
                "edit.replace=[' was',' was not']",
                "n_samples=2",
                "max_new_tokens=5",
                f"out={tmp_path}/pert.h5",
            ],
        )
    )["archive"]
    ans = tiny_answers(tmp_path, cache_dir, tmp_path / "ans.h5")
    for path in (pert, ans):
        with Archive(path) as a:
            explorer.write(a, Path(path).with_suffix(".html"), topk=5)
    return pert, ans


def test_perturbation_and_answers_archives_render(pert_and_answers):
    """Their samples render as ordinary samples, with a view of their own beside them
    (checked in `test_the_perturbation_view` and `test_the_answers_view`)."""
    pert, ans = pert_and_answers
    for path in (pert, ans):
        out = Path(path).with_suffix(".cli.html")
        res = engine_cli("inspect", str(path), "--html", str(out))
        assert res.returncode == 0, res.stderr
        data = embedded(out)
        with Archive(path) as a:
            assert (a.lineage() is None) != (a.answers() is None)
            s = a.samples()
            assert len(data["samples"]) == a.n_complete
            for d in data["samples"]:
                i = d["sample"]
                assert d["tokens"] == s["tokens"][i, : int(s["length"][i])].tolist()
                assert d["prompt_text"] == a.model().prompt_text[d["prompt"]]
            assert [m["id"] for m in data["measures"]] == ["p", "entropy"]


def test_the_perturbation_view(pert_and_answers):
    """Each sample of a perturbation archive carries the other variant's continuation at the
    same position in its prompt (same parent and cut, the other prefix), its tokens as stored
    and the generator's p of each, recomputed here from the stored rows in float64."""
    pert, _ = pert_and_answers
    out = Path(pert).with_suffix(".html")
    data = embedded(out)
    with Archive(pert) as a:
        lin, s = a.lineage(), a.samples()
        by_prompt = {}
        for i in range(a.n_complete):
            by_prompt.setdefault(int(s["prompt_index"][i]), []).append(i)
        seen = set()
        for d in data["samples"]:
            v, o = d["perturbation"], d["perturbation"]["other"]
            p, q = d["prompt"], int(s["prompt_index"][o["sample"]])
            assert v["variant"] == lin["variant"][p] != o["variant"] == lin["variant"][q]
            assert lin["parent_sample"][p] == lin["parent_sample"][q] == v["parent"]
            assert lin["cut"][p] == lin["cut"][q] == v["cut"]
            assert by_prompt[p].index(d["sample"]) == by_prompt[q].index(o["sample"])
            n = int(s["length"][o["sample"]])
            assert o["tokens"] == s["tokens"][o["sample"], :n].tolist()
            rows = a.model().rows(o["sample"], slice(0, n)).astype(np.float64)
            lp = rows - rows.max(-1, keepdims=True)
            lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
            want = np.exp(lp[np.arange(n), o["tokens"]])
            assert np.allclose(o["token_p"], want, atol=1e-6)
            seen.add((d["sample"], o["sample"]))
        assert len(seen) == len(data["samples"]) == a.n_complete
        assert {(b, a_) for a_, b in seen} == seen  # the pairing is mutual


def test_the_answers_view(pert_and_answers):
    """An answers archive's page carries each model's exact distribution over the candidates:
    the same numbers as analysis=answers' `candidate_logp`, normalised, to float precision."""
    from analyses.answers import candidate_logp

    _, ans = pert_and_answers
    data = embedded(Path(ans).with_suffix(".html"))
    A = data["answers"]
    with Archive(ans) as a:
        assert A["candidates"] == a.answers()["candidates"] == ["ab", "abc", "b"]
        for key in a.models:
            lp = candidate_logp(a, key).astype(np.float64)
            q = np.exp(lp - lp.max())
            q /= q.sum()
            assert np.allclose(A["models"][key]["p"], q, atol=1e-6)
            assert np.allclose(A["models"][key]["logp"], lp, atol=1e-4)
            assert A["models"][key]["mass"] == pytest.approx(np.exp(lp).sum(), rel=1e-5)
    assert all("perturbation" not in d for d in data["samples"])


# ---- in a real browser -------------------------------------------------------------------------
def chromium() -> str | None:
    """A Chromium binary: $LOGIT_ENGINE_CHROMIUM, else the first of the usual names on PATH
    (Debian's `chromium` package: /usr/bin/chromium)."""
    names = (
        os.environ.get("LOGIT_ENGINE_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    )
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def panel(page, key: str) -> dict:
    sec = f'#panel-models section[data-model="{key}"]'
    alts = page.eval_on_selector_all(
        f"{sec} .alt",
        "els => els.map(e => [Number(e.dataset.token), Number(e.dataset.prob), "
        "e.querySelector('.num').textContent])",
    )
    return {
        "ids": [a[0] for a in alts],
        "p": [a[1] for a in alts],
        "printed": [a[2] for a in alts],
        "entropy": float(page.text_content(f"{sec} .entropy")),
        "token_p": float(page.get_attribute(f"{sec} .sampled-prob", "data-prob")),
        "token_rank": int(page.get_attribute(f"{sec} .sampled-rank", "data-rank")),
    }


def check_panel(page, a: Archive, sample: int, step: int, k: int) -> None:
    assert page.get_attribute("#panel-body", "data-sample") == str(sample)
    assert page.get_attribute("#panel-body", "data-step") == str(step)
    for key in (BASE, TWIN):
        got, want = panel(page, key), inspect_topk(a, key, sample, step, k)
        assert got["ids"] == want["ids"], (key, step)
        assert np.allclose(got["p"], want["p"], atol=1e-4), (key, step, got["p"], want["p"])
        assert got["printed"] == [f"{p:.4f}" for p in got["p"]]  # 4 decimals
        assert got["entropy"] == pytest.approx(want["entropy"], abs=1e-4)
        assert got["token_p"] == pytest.approx(want["token_p"], abs=1e-4)
        assert got["token_rank"] == want["token_rank"]


def test_the_page_in_headless_chromium(pair_archive, tmp_path):
    out = tmp_path / "explorer.html"
    k = 10
    with Archive(pair_archive) as a:
        explorer.write(a, out, topk=k)
        data = embedded(out)
        with browser_page(out.as_uri()) as page:
            n0 = len(data["samples"][0]["tokens"])
            assert page.locator("#text .tok").count() == n0

            # hover a token: the panel shows both models' top-k, as inspect prints them
            page.hover('#text .tok[data-sample="0"][data-step="2"]')
            check_panel(page, a, 0, 2, k)
            sampled = page.get_attribute('#text .tok[data-step="2"]', "data-token")
            assert sampled == str(data["samples"][0]["tokens"][2])

            # another measure: other colours, and the legend follows
            colours = lambda: page.eval_on_selector_all(  # noqa: E731
                "#text .tok", "els => els.map(e => getComputedStyle(e).backgroundColor)"
            )
            before = colours()
            assert page.get_attribute("#legend", "data-measure") == "p"
            for measure in ("entropy", "kl", "dlogp", "shift"):
                page.select_option("#measure-select", measure)
                assert page.get_attribute("#legend", "data-measure") == measure
                assert colours() != before, measure
            page.select_option("#measure-select", "entropy")
            after = colours()
            assert len(set(after)) > 1 and after != before

            # the right arrow moves the focus to the next token; the panel follows (the
            # select boxes keep their own arrow keys: a click gives the text the keys)
            page.click('#text .tok[data-step="2"]')
            check_panel(page, a, 0, 2, k)
            page.keyboard.press("ArrowRight")
            current = page.locator("#text .tok.current")
            assert current.count() == 1 and current.get_attribute("data-step") == "3"
            assert page.evaluate("document.activeElement.dataset.step") == "3"
            outline = page.eval_on_selector(
                "#text .tok.current", "e => getComputedStyle(e).outlineStyle"
            )
            assert outline == "solid"  # a visible focus
            check_panel(page, a, 0, 3, k)
            page.keyboard.press("ArrowLeft")
            assert page.get_attribute("#text .tok.current", "data-step") == "2"
            check_panel(page, a, 0, 2, k)
            page.screenshot(path=str(tmp_path / "explorer.png"))

            # another sample: its tokens, coloured by the chosen measure
            page.select_option("#sample-select", "3")
            s3 = data["samples"][3]
            assert page.locator(f'#text .tok[data-sample="{s3["sample"]}"]').count() == len(
                s3["tokens"]
            )
            page.hover(f'#text .tok[data-sample="{s3["sample"]}"][data-step="0"]')
            check_panel(page, a, s3["sample"], 0, k)
    shot = tmp_path / "explorer.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page at `url` (skips where none can run); on leaving, no page
    error, no console error and no request beyond the file itself."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not importable (pip install playwright: the test extra)")
    exe = chromium()
    if exe is None:
        pytest.skip(
            "no Chromium binary found (apt-get install chromium, or set LOGIT_ENGINE_CHROMIUM)"
        )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(30_000)
            problems, requests = [], []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            yield page
            assert problems == []
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
        finally:
            browser.close()


def test_the_perturbation_and_answers_views_in_headless_chromium(pert_and_answers, tmp_path):
    """The perturbation page lays the two continuations out by generated step (a cell per
    token, p as embedded), hovering a cell of the sample's row moves the panel and marks that
    step in both rows; the answers page lists every candidate with each model's P, and a
    click on a candidate opens it as the sample."""
    pert, ans = pert_and_answers
    out = Path(pert).with_suffix(".html")
    data = embedded(out)
    with browser_page(out.as_uri()) as page:
        d = data["samples"][0]
        o = d["perturbation"]["other"]
        cells = lambda row: page.eval_on_selector_all(  # noqa: E731
            f"#aligned td[data-row='{row}']",
            "els => els.map(e => [Number(e.dataset.token), Number(e.dataset.prob)])",
        )
        this, other = cells("this"), cells("other")
        assert [t for t, _ in this] == d["tokens"] and [t for t, _ in other] == o["tokens"]
        assert np.allclose([p for _, p in other], o["token_p"], atol=1e-9)
        assert np.allclose([p for _, p in this], d["models"][data["models"][0]["key"]]["token_p"])
        page.hover("#aligned td[data-row='this'][data-step='1']")
        assert page.get_attribute("#panel-body", "data-step") == "1"
        assert page.locator("#aligned td.current").count() == 2  # step 1 of both rows
        page.screenshot(path=str(tmp_path / "perturbation.png"))
    out = Path(ans).with_suffix(".html")
    data = embedded(out)
    with browser_page(out.as_uri()) as page:
        A = data["answers"]
        base = data["models"][0]["key"]
        rows = page.eval_on_selector_all(
            "#answers tr[data-candidate]",
            f"els => els.map(e => [Number(e.dataset.candidate), "
            f"Number(e.querySelector('td.num[data-model=\"{base}\"]').dataset.prob)])",
        )
        assert sorted(i for i, _ in rows) == list(range(len(A["candidates"])))
        assert [p for _, p in rows] == sorted((p for _, p in rows), reverse=True)
        assert all(p == A["models"][base]["p"][i] for i, p in rows)
        page.click("#answers tr[data-candidate='2']")
        assert page.locator("#text .tok").first.get_attribute("data-sample") == "2"
        assert page.get_attribute("#answers tr.current", "data-candidate") == "2"
        page.screenshot(path=str(tmp_path / "answers.png"))
