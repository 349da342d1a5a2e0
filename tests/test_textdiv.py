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
