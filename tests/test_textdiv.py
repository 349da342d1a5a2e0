"""The `diversity` package's text scores (analyses/lib/textdiv.py) against numbers worked out
by hand from its 0.3.0 code, and the compression ratio against the package's own file-based
procedure (compression.py) run here step by step."""

from __future__ import annotations

import gzip
import lzma
import math
import random

import pytest

from analyses.lib import textdiv as T


def test_ngram_diversity_score_by_hand():
    # "a b a" + " " + "b" -> [a, b, a, b]: 2/4 + 2/3 + 2/2 + 1/1
    assert T.ngram_diversity_score(["a b a", "b"]) == round(0.5 + 2 / 3 + 1 + 1, 3) == 3.167
    # split on the space character, not on whitespace: two spaces make an empty token and a
    # newline stays inside its token ([a, "", b] and [a\nb, c]: every n-gram unique)
    assert T.ngram_diversity_score(["a  b"], num_n=3) == 3.0
    assert T.ngram_diversity_score(["a\nb c", "c"], num_n=2) == round(2 / 3 + 1, 3)
    assert T.ngram_diversity_score(["x x x x x"]) == round(1 / 5 + 1 / 4 + 1 / 3 + 1 / 2, 3)
    with pytest.raises(ValueError, match="fewer than 4 tokens"):
        T.ngram_diversity_score(["a b c"])


def test_self_repetition_score_by_hand():
    # 4-grams: d1 {abcd, bcde}, d2 {abcd, bcdx}, d3 {qrst}; abcd is in 2 documents:
    # d1 and d2 see it once elsewhere -> ln 2 each; d3 -> ln 1
    docs = ["a b c d e", "a b c d x", "q r s t"]
    assert T.self_repetition_score(docs) == pytest.approx(2 * math.log(2) / 3, abs=1e-15)
    # a 4-gram repeated inside one document counts once (distinct per document)
    assert T.self_repetition_score(["a b c d a b c d", "a b c d"]) == pytest.approx(math.log(2))
    # documents shorter than 4 tokens have no 4-grams: ln(1 + 0)
    assert T.self_repetition_score(["a b", "a b"]) == 0.0
    # identical documents: each of n documents sees each of its k 4-grams n - 1 times
    assert T.self_repetition_score(["u v w x y"] * 3) == pytest.approx(math.log(1 + 2 * 2))


def package_compression_ratio(texts, algorithm, tmp_path):
    """compression.py of diversity 0.3.0, line for line, the gzip timestamps fixed."""
    (tmp_path / "original.txt").write_text(" ".join(texts), encoding="utf-8")
    original = (tmp_path / "original.txt").stat().st_size
    if algorithm == "gzip":
        with gzip.GzipFile(str(tmp_path / "compressed.gz"), "w+", mtime=T.GZIP_MTIME) as f:
            f.write(gzip.compress(" ".join(texts).encode("utf-8"), mtime=T.GZIP_MTIME))
    else:
        with lzma.open(str(tmp_path / "compressed.gz"), "wb") as f:
            f.write(" ".join(texts).encode("utf-8"))
    return round(original / (tmp_path / "compressed.gz").stat().st_size, 3)


@pytest.mark.parametrize("algorithm", ["gzip", "xz"])
def test_compression_ratio_is_the_packages(algorithm, tmp_path):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "é", "dog", "fast\nhome", "ünïcode"]
    for _ in range(50):
        texts = [
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
            for _ in range(rng.randint(1, 8))
        ]
        want = package_compression_ratio(texts, algorithm, tmp_path)
        assert T.compression_ratio(texts, algorithm) == want, texts


def test_compression_ratio_orders_repetitive_above_varied():
    rng = random.Random(1)
    varied = [" ".join(str(rng.randrange(10**6)) for _ in range(40)) for _ in range(8)]
    same = ["the model says the same thing again and again"] * 8
    for algorithm in ("gzip", "xz"):
        assert T.compression_ratio(same, algorithm) > 3 > T.compression_ratio(varied, algorithm)
    with pytest.raises(ValueError, match="gzip or xz"):
        T.compression_ratio(same, "zip")


def test_rouge_tokens_and_lcs_by_hand():
    # rouge-score's tokenizer: lower-case, any run outside a-z0-9 separates ("ç" too)
    assert T.rouge_tokens("Hello, WORLD! ça-va 42x") == ["hello", "world", "a", "va", "42x"]
    assert T.rouge_tokens(" ...!") == []
    assert T.lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example
    # [the cat sat] vs [the cat on the mat]: LCS 2, P 2/5, R 2/3, F = 0.5
    a, b = T.rouge_tokens("The cat sat."), T.rouge_tokens("the cat, on the mat")
    assert T.rouge_l_f(a, b) == T.rouge_l_f(b, a) == pytest.approx(0.5, abs=1e-15)
    assert T.rouge_l_f([], b) == 0.0


def test_homogenization_rougel_by_hand():
    # pairs: AB 0.5, AC 0, BC 0 -> per document 0.25, 0.25, 0 -> 1/6, rounded as the package
    texts = ["the cat sat", "the cat on the mat", "dogs run"]
    assert T.homogenization_rougel(texts) == round(0.5 / 3, 3) == 0.167
    assert T.homogenization_rougel(["same words here"] * 4) == 1.0
    # the package's zero case: no pair shares a word -> 1.0 (kept as its code has it)
    assert T.homogenization_rougel(["a b", "c d", "e"]) == 1.0
    assert math.isnan(T.homogenization_rougel(["only one"]))


def test_sentence_bleu_by_hand():
    # [a b c d] vs [a b c e]: p1..p4 = 3/4, 2/3, 1/2, 0/1 -> 0.1/1 (method1); bp 1
    want = (0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25
    assert T.sentence_bleu([["a", "b", "c", "e"]], ["a", "b", "c", "d"]) == pytest.approx(want)
    assert T.self_bleu(["a b c d", "a b c e"]) == pytest.approx(want)
    # short hypothesis: p = 1, 1, 0.1, 0.1 and brevity penalty exp(1 - 4/2)
    assert T.sentence_bleu([list("abcd")], list("ab")) == pytest.approx(math.exp(-1) * 0.1**0.5)
    # long hypothesis: p = 2/4, 1/3, 0.1/2, 0.1/1, no penalty
    want = (0.5 / 3 * 0.05 * 0.1) ** 0.25
    assert T.sentence_bleu([list("ab")], list("abcd")) == pytest.approx(want)
    # closest reference length: a tie (2 and 4 for a hypothesis of 3) goes to the shorter,
    # so no penalty; clipped counts take the maximum over references
    assert T.sentence_bleu([list("ab"), list("abcx")], list("abc")) == pytest.approx(0.1**0.25)
    assert T.sentence_bleu([list("xyz")], list("abc")) == 0.0  # no unigram in common
    assert T.self_bleu(["a b c d"] * 3) == pytest.approx(1.0)
    assert math.isnan(T.self_bleu(["one"]))
