"""The persona prompt set, `chat_template=auto`, the persona parser, and the `personas`
analysis on an archive whose completions are planted texts with a known parse."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from analyses.__main__ import run as run_analysis
from analyses.lib.persona_parse import lead_field, parse, sentences
from engine.archive import Archive
from engine.commands import dump as dump_mod
from engine.commands import score as score_mod
from engine.errors import EngineError
from engine.runtime import models
from engine.runtime.prompts import render
from tests.conftest import compose_cfg, compose_dump
from tests.test_analyses import analysis_cfg

CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"


def test_parser_reads_decorated_forms():
    p = parse(
        "1. **First Name:** Emily\n2. **Last Name:** Chen\n3. **Gender:** Woman\n"
        "4. **Age:** 34 years old\n- Nationality - American\n* Ethnic background: Asian-American\n"
        '**Personality type:** INFJ-A (Advocate)\nReview: "I love it! As a busy professional, '
        'it is a game changer.\nI highly recommend it."'
    )
    assert p.complete
    assert p.values == {
        "first_name": "Emily",
        "last_name": "Chen",
        "gender": "female",
        "age": 34,
        "nationality": "American",
        "ethnicity": "Asian-American",
        "mbti": "INFJ",
        "review": "I love it! As a busy professional, it is a game changer.\n"
        "I highly recommend it.",
    }
    assert sentences(p.values["review"]) == [
        "I love it!",
        "As a busy professional, it is a game changer.",
        "I highly recommend it.",
    ]
    assert sentences("<the customer's review>\nGreat machine. Ok.") == ["Great machine."]


def test_parser_states_and_fallbacks():
    p = parse("Name: Ana Maria Lopez\nSex: F\nAge: thirty\nMBTI: outgoing\nReview: <the review>")
    assert p.values == {"first_name": "Ana", "last_name": "Maria Lopez", "gender": "female"}
    assert p.status == {
        "first_name": "ok",
        "last_name": "ok",
        "gender": "ok",
        "age": "invalid",
        "nationality": "missing",
        "ethnicity": "missing",
        "mbti": "invalid",
        "review": "invalid",
    }
    # the prompt ended on "First name:", so the completion starts inside that field
    assert parse(" Emily\nLast name: Chen", lead="first_name").values == {
        "first_name": "Emily",
        "last_name": "Chen",
    }
    assert parse("\n\n Emily\nLast name: Chen", lead="first_name").values["first_name"] == "Emily"
    # no lead, but a bare first line followed by the next field's label
    assert parse("Emily\nLast name: Chen").values["first_name"] == "Emily"
    assert "first_name" not in parse("Sure, here it is:\nLast name: Chen\n").values
    # first occurrence wins; age out of range is invalid; a review runs to the next label
    p = parse("Age: 250\nAge: 30\nReview: Great.\nStill great.\nGender: male")
    assert p.status["age"] == "invalid" and p.values["review"] == "Great.\nStill great."
    assert parse("Gender: ...").status["gender"] == "invalid"
    names = parse("First name: José María\nLast name: O'Brien-Smith\nAge: 41")
    assert names.values == {"first_name": "José María", "last_name": "O'Brien-Smith", "age": 41}
    for junk in ("@thm@x-sh", "[X |M|D", "Li 3", "Anna Maria Luisa Rossi"):
        assert parse(f"First name: {junk}").status["first_name"] == "invalid", junk
    assert parse("").status == {f: "missing" for f in p.status}


def test_lead_field_is_the_label_the_prompt_ends_on():
    assert lead_field("Fill in the form.\n\nFirst name:") == "first_name"
    assert lead_field("Fill in the form.\nFirst name: <first name>") is None
    # a chat template's markers and role lines are not part of the form
    assert lead_field("<|user|>First name:<|assistant|>\n") == "first_name"
    assert lead_field("<|user|>First name: Ann<|assistant|>\n") is None


def test_chat_template_auto_follows_the_tokenizer():
    tok = models.tiny_random_tokenizer()
    assert render(tok, "hi", "auto") == render(tok, "hi", False)
    with pytest.raises(EngineError, match="no chat template"):
        render(tok, "hi", True)
    with pytest.raises(EngineError, match="true, false or auto"):
        render(tok, "hi", "yes")
    tok.chat_template = CHAT
    shown, _ = render(tok, "hi", "auto")
    assert shown == "<|user|>hi<|assistant|>" == render(tok, "hi", True)[0]


def test_persona_prompts_use_auto_and_score_inherits_it(tmp_path, cache_dir, monkeypatch):
    plain = models.tiny_random_tokenizer

    def with_template():
        tok = plain()
        tok.chat_template = CHAT
        return tok

    monkeypatch.setattr(models, "tiny_random_tokenizer", with_template)
    cfg = compose_dump(
        tmp_path,
        cache_dir,
        ["model=tiny-random", "prompts=personas", "n_samples=2", "max_new_tokens=3", "codec=fp32"],
    )
    assert cfg.chat_template == "auto"
    src = dump_mod.run(cfg)["archive"]
    score_mod.run(
        compose_cfg(
            "score",
            tmp_path,
            cache_dir,
            [f"archive={src}", "model=tiny-random", "model.key=inherits"],
        )
    )
    score_mod.run(
        compose_cfg(
            "score",
            tmp_path,
            cache_dir,
            [f"archive={src}", "model=tiny-random", "model.key=raw", "chat_template=false"],
        )
    )
    with Archive(src) as a:
        shown = [
            a.model(k).group["prompt_text"].asstr()[0] for k in ("tiny-random", "inherits", "raw")
        ]
        assert shown[0].startswith("<|user|>Create one customer persona") and shown[0] == shown[1]
        assert shown[2].startswith("<s>Create one customer persona") and shown[2].endswith(
            "First name:"
        )
        assert a.model().chat_template is True and a.model("inherits").chat_template is True
        assert a.model("raw").chat_template is False


# Planted completions of a tiny-random personas archive: its prompt ends on "First name:", its
# tokenizer is byte-level, so the tokens of any text can be written in as a "completion".
PLANTED = [
    " Emily\nLast name: Chen\nGender: Female\nAge: 34\nNationality: American\nEthnicity: Asian\n"
    "MBTI type: INFJ\nReview: I highly recommend this coffee machine. It keeps my coffee warm.",
    " **Emily**\n**Last name:** Smith\n**Gender:** F\n**Age:** 29 years old\n**Nationality:** American\n"
    "**Ethnicity:** White\n**MBTI type:** ENFP-T\n**Review:** I highly recommend this coffee machine! "
    "The smartwatch app never connects.",
    " Sarah\n2. Last name - Jones\nGender: male\nAge: unknown\nNationality: British\nMBTI: intj\n"
    "Review: The smartwatch app never connects. Terrible product, I hate it.",
    " <first name>\nLast name: Chen\nGender: Female\nAge: 34\nNationality: Chinese\nEthnicity: Asian\n"
    "Personality type: outgoing\n",
    "I don't want to fill this in.",
]
PLANTED.append(PLANTED[0])  # written with an EOS token, which the analysis must drop
REVIEWS = {
    0: "I highly recommend this coffee machine. It keeps my coffee warm.",
    1: "I highly recommend this coffee machine! The smartwatch app never connects.",
    2: "The smartwatch app never connects. Terrible product, I hate it.",
}
REVIEWS[5] = REVIEWS[0]
EXPECTED = {  # attribute: (counts of the parsed values, invalid, missing)
    "first_name": ({"Emily": 3, "Sarah": 1}, 2, 0),
    "last_name": ({"Chen": 3, "Smith": 1, "Jones": 1}, 0, 1),
    "gender": ({"female": 4, "male": 1}, 0, 1),
    "age": ({34: 3, 29: 1}, 1, 1),
    "nationality": ({"American": 3, "British": 1, "Chinese": 1}, 0, 1),
    "ethnicity": ({"Asian": 3, "White": 1}, 0, 2),
    "mbti": ({"INFJ": 2, "ENFP": 1, "INTJ": 1}, 1, 1),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("personas")
    tok = models.tiny_random_tokenizer()
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in PLANTED]
    ids[5] = ids[5] + [tok.eos_token_id]
    T = max(map(len, ids))
    cfg = compose_dump(
        tmp,
        cache_dir,
        [
            "model=tiny-random",
            "prompts=personas",
            "n_samples=6",
            "batch_size=6",
            f"max_new_tokens={T}",
        ],
    )
    path = dump_mod.run(cfg)["archive"]
    with h5py.File(path, "r+") as f:
        s = f["samples"]
        tokens = np.full((6, T), -1, np.int32)
        for i, q in enumerate(ids):
            tokens[i, : len(q)] = q
        s["tokens"][...] = tokens
        s["length"][...] = [len(q) for q in ids]
        s["finish_reason"][...] = [0, 0, 0, 0, 0, 1]
    return path


def test_personas_report_matches_the_planted_truth(planted, tmp_path):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    run_analysis(analysis_cfg(tmp_path, "analysis=personas", f"archive={planted}"))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_personas"] == 6 and s["complete_forms"] == 3 and s["complete_form_rate"] == 0.5
    assert s["n_truncated"] == 5 and s["incomplete_examples"] == [2, 3, 4]
    for name, (counts, invalid, missing) in EXPECTED.items():
        got = s["attributes"][name]
        assert {str(v): k for v, k in got["counts"]} == {str(v): k for v, k in counts.items()}
        n = sum(counts.values())
        assert s["parse"][name] == {
            "ok": n,
            "invalid": invalid,
            "missing": missing,
            "failure_rate": pytest.approx((6 - n) / 6),
        }
        H = scipy_entropy(list(counts.values()))
        cap = min(n, {"mbti": 16, "age": 121}.get(name, n))
        assert got["distinct"] == len(counts) and got["n"] == n
        assert got["entropy_nats"] == pytest.approx(H, abs=1e-12)
        assert got["normalized_entropy"] == pytest.approx(H / np.log(cap), abs=1e-12)
        assert got["evenness"] == pytest.approx(H / np.log(len(counts)), abs=1e-12)
    assert s["parse"]["review"] == {
        "ok": 4,
        "invalid": 0,
        "missing": 2,
        "failure_rate": pytest.approx(2 / 6),
    }
    ages = [34, 29, 34, 34]
    assert s["age"]["mean"] == pytest.approx(np.mean(ages)) and s["age"]["max"] == 34
    texts = [REVIEWS[i] for i in (0, 1, 2, 5)]
    vader = SentimentIntensityAnalyzer()
    comp = np.array([vader.polarity_scores(t)["compound"] for t in texts])
    r = s["reviews"]
    assert r["n"] == 4
    assert r["length_chars"]["mean"] == pytest.approx(np.mean([len(t) for t in texts]))
    assert r["length_words"]["max"] == max(len(t.split()) for t in texts)
    assert r["sentiment"]["mean"] == pytest.approx(comp.mean())
    assert r["sentiment"]["share_positive"] == pytest.approx(np.mean(comp >= 0.05))
    assert r["sentiment"]["share_negative"] == pytest.approx(np.mean(comp <= -0.05))
    assert sum(r["sentiment"]["histogram"]["counts"]) == 4
    assert comp[2] < 0 < comp[0]  # the planted complaint is negative, the praise positive


def test_personas_sentence_clusters_and_files(planted, tmp_path):
    import csv

    run_analysis(analysis_cfg(tmp_path, "analysis=personas", f"archive={planted}"))
    s = json.loads((tmp_path / "summary.json").read_text())
    planted_sents = [x for i in (0, 1, 2, 5) for x in sentences(REVIEWS[i])]
    assert s["sentences"]["n"] == len(planted_sents) == 8
    cl = s["sentences"]["clusters"]
    assert 2 <= s["sentences"]["k"] == len(cl) and sum(c["size"] for c in cl) == 8
    with open(tmp_path / "sentences.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["sentence"] for r in rows) == sorted(planted_sents)
    cluster_of = {}
    for r in rows:  # the same sentence always lands in the same cluster
        assert cluster_of.setdefault(r["sentence"], r["cluster"]) == r["cluster"]
    for c in cl:
        assert c["examples"] and all(e in planted_sents for e in c["examples"])
    with open(tmp_path / "personas.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == PLANTED  # EOS dropped from the last one
    assert rows[3]["first_name"] == "" and rows[3]["first_name_status"] == "invalid"
    for stem in ("attributes", "reviews", "sentence_clusters"):
        assert (tmp_path / f"{stem}.png").exists() and (tmp_path / f"{stem}.svg").exists()


def test_personas_on_an_archive_without_forms_counts_every_failure(tiny_archive, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run_analysis(analysis_cfg(tmp_path, "analysis=personas", f"archive={tiny_archive}"))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_personas"] == 6 and s["complete_forms"] == 0
    assert all(
        v == {"ok": 0, "invalid": 0, "missing": 6, "failure_rate": 1.0} for v in s["parse"].values()
    )
    assert s["reviews"]["n"] == 0 and s["sentences"]["n"] == 0
    assert "dumped with prompts=personas" in caplog.text


def test_real_smollm2_persona_answers_start_in_the_first_field():
    """SmolLM2-135M-Instruct's own answers to the persona prompt, through its chat template
    (tests/data/smollm2-personas.json): the form ends on `First name:` inside the user turn,
    so the answer's first line is the first name ("Sid Ironstone Designer"), which was never
    read when the template's `<|im_start|>assistant` line hid the label."""
    import json
    from pathlib import Path

    from analyses.lib.persona_parse import lead_field, parse

    data = json.loads((Path(__file__).parent / "data" / "smollm2-personas.json").read_text())
    assert data["prompt_text"].rstrip().endswith("<|im_start|>assistant")
    lead = lead_field(data["prompt_text"])
    assert lead == "first_name"
    people = [parse(t, lead) for t in data["completions"]]
    assert people[0].values["first_name"] == "Sid Ironstone Designer"
    assert people[0].status["mbti"] == "invalid"  # "MBTI type: BFl Am Kadhel" is no MBTI type
    assert all(p.status["first_name"] != "missing" for p in people)
    assert lead_field("Review: <the review>\n\nFirst name:") == "first_name"  # raw text too


def test_personas_warns_only_when_the_prompts_are_not_the_persona_set(
    tiny_archive, tmp_path, caplog
):
    from analyses.__main__ import run as run_analysis
    from tests.test_analyses import analysis_cfg

    with caplog.at_level("WARNING"):
        run_analysis(analysis_cfg(tmp_path, "analysis=personas", f"archive={tiny_archive}"))
    assert "was not dumped with prompts=personas" in caplog.text
