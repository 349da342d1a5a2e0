"""Text-diversity scores with the `diversity` package's definitions (Shaib et al. 2024,
"Standardizing the Measurement of Text Diversity"; PyPI `diversity` 0.3.0).  The package pins
transformers < 5, so it cannot be a dependency: each score here follows its *code* (read from
the 0.3.0 wheel), named after it, and tests/test_textdiv.py checks each against numbers
worked out by hand from that code on fixed texts.  Where the code differs from its README or
docstrings, the code wins, and the difference is said here:

- `compression_ratio` (compression.py): the texts joined by single spaces; raw UTF-8 bytes
  over compressed bytes, rounded to 3 decimals (>= 1 for text; higher = more repetitive; the
  README calls it 0-1).  For gzip the package writes `gzip.compress(text)` *through* a
  `GzipFile` named compressed.gz: the text is compressed twice and the size includes both
  headers (the outer one holding the name "compressed").  Reproduced exactly, but for the
  inner stream's 4-byte timestamp, which the package takes from the clock and which the outer
  compression then has to encode: a timestamp of 0 compresses 4 bytes smaller than a real
  one, so the package's own result depends (by a few bytes, rarely) on when it runs.  Here
  it is fixed at 2026-01-01T00:00:00Z (`GZIP_MTIME`), a real time's bytes: the sizes the
  package gives today.  xz: one `lzma` stream, default preset.
- `ngram_diversity_score` (ngram_diversity.py): the texts joined by spaces and split on the
  single space character (not on whitespace: a newline stays inside its token, two spaces
  make an empty token); sum over n = 1..num_n of unique n-grams / all n-grams; 0..num_n.
- `self_repetition_score` (self_repetition.py): per document, its distinct 4-grams of
  whitespace tokens (the package's `n` argument is ignored: it always uses 4); for each, the
  number of *other* documents that contain it, summed; the score is the mean over documents
  of ln(1 + that sum).

Plain functions over lists of strings, no I/O: analyses call them per prompt (its K
completions) and across prompts (first completions), with bootstrap intervals.
"""

from __future__ import annotations

import gzip
import io
import lzma
import math
from collections import Counter

GZIP_MTIME = 1767225600  # 2026-01-01T00:00:00Z: the inner gzip stream's timestamp (see above)


def compression_ratio(texts: list[str], algorithm: str = "gzip") -> float:
    """Raw bytes / compressed bytes of the texts joined by spaces (diversity 0.3.0)."""
    raw = " ".join(texts).encode("utf-8")
    if algorithm == "gzip":
        inner = gzip.compress(raw, mtime=GZIP_MTIME)
        buf = io.BytesIO()
        with gzip.GzipFile(filename="compressed.gz", mode="wb", fileobj=buf, mtime=GZIP_MTIME) as g:
            g.write(inner)
        size = len(buf.getvalue())
    elif algorithm == "xz":
        size = len(lzma.compress(raw))
    else:
        raise ValueError(f"algorithm must be gzip or xz, got {algorithm!r}")
    return round(len(raw) / size, 3)


def ngrams(seq, n: int) -> list[tuple]:
    """The n-grams of a sequence, in order, as tuples (nltk.ngrams without padding)."""
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def ngram_diversity_score(texts: list[str], num_n: int = 4) -> float:
    """Sum over n = 1..num_n of unique / total n-grams of the joined corpus (diversity 0.3.0)."""
    tokens = " ".join(texts).split(" ")
    score = 0.0
    for n in range(1, num_n + 1):
        grams = ngrams(tokens, n)
        if not grams:  # the package divides by zero here; a corpus this short has no score
            raise ValueError(f"fewer than {n} tokens: no {n}-grams to count")
        score += len(set(grams)) / len(grams)
    return round(score, 3)


def self_repetition_score(texts: list[str]) -> float:
    """Mean over documents of ln(1 + occurrences of its distinct 4-grams in the other
    documents) (diversity 0.3.0; always 4-grams of whitespace tokens)."""
    if not texts:
        raise ValueError("no documents")
    per_doc = [{" ".join(g) for g in ngrams(t.split(), 4)} for t in texts]
    counts = Counter(g for doc in per_doc for g in doc)
    return sum(math.log(sum(counts[g] for g in doc) - len(doc) + 1) for doc in per_doc) / len(texts)
