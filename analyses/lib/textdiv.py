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
- `homogenization_rougel` (homogenization.py, its default `measure='rougel'`, stemmer off):
  for each document i, the mean over j != i of the ROUGE-L F-measure of i and j (rouge-score
  0.1.2, `RougeScorer(['rougeL'], use_stemmer=False)`: lower-cased, every run of characters
  other than a-z 0-9 a separator; LCS length over each side's token count; F the harmonic
  mean, 0 where either side has no token); the score is the mean over documents, rounded to
  3 decimals.  The package's README names Self-BLEU as its default measure; the code's
  default is ROUGE-L.  Reproduced too: where every pair scores 0 (no word shared anywhere)
  the package returns 1.0 (its comment: "all strings are the exact same"), the top of the
  scale; NaN for fewer than 2 documents (the package divides by zero).  rouge-score's
  tokenizer and LCS are re-implemented here (it ships as a source archive only); the
  package's bertscore measure needs a model and is not offered.
- Self-BLEU (`self_bleu`): not the package's `measure='bleu'`, whose code divides one
  corpus-BLEU (HF evaluate, no smoothing) by n - 1 a second time (its comment: "Need to double
  check that this is right"), but the definition the term names (Zhu et al. 2018, Texygen,
  utils/metrics/SelfBleu.py `get_bleu_parallel`): each document is the hypothesis against all
  the others as references, nltk's `sentence_bleu` (uniform weights over n = 1..4, smoothing
  `SmoothingFunction().method1`: a zero n-gram count becomes 0.1 over its denominator;
  brevity penalty from the closest reference length, ties to the shorter; 0 where no unigram
  matches), averaged over documents.  Texygen tokenises with nltk.word_tokenize, which needs
  nltk's punkt data; here documents are split on whitespace (said wherever it is reported).
  Higher = more alike, like the homogenization score.

Plain functions over lists of strings, no I/O: analyses call them per prompt (its K
completions) and across prompts (first completions), with bootstrap intervals.
"""

from __future__ import annotations

import functools
import gzip
import io
import lzma
import math
import re
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


ROUGE_SEPARATOR = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=4096)
def _rouge_tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in ROUGE_SEPARATOR.split(text.lower()) if t)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score 0.1.2's tokens without stemming (tokenize.py): lower-case, split on every
    run of characters other than a-z and 0-9, empty tokens dropped."""
    return list(_rouge_tokens(text))


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (rouge_scorer._lcs_table's last cell)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists (rouge_scorer._score_lcs; symmetric in a, b)."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    precision, recall = lcs / len(b), lcs / len(a)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


@functools.lru_cache(maxsize=1 << 17)
def _rouge_pair(a: str, b: str) -> float:
    """rouge_l_f of two texts, remembered: the cross-input draws score the same pairs again."""
    return rouge_l_f(list(_rouge_tokens(a)), list(_rouge_tokens(b)))


def homogenization_rougel(texts: list[str]) -> float:
    """Mean over documents of the mean ROUGE-L F to every other document (diversity 0.3.0
    `homogenization_score`, measure 'rougel', no stemming; 1.0 where no pair shares a word,
    as the package does; NaN for fewer than 2 documents)."""
    n = len(texts)
    if n < 2:
        return float("nan")
    pair = {}
    for i in range(n):
        for j in range(i + 1, n):
            pair[i, j] = pair[j, i] = _rouge_pair(*sorted((texts[i], texts[j])))
    total = sum(sum(pair[i, j] for j in range(n) if j != i) / (n - 1) for i in range(n))
    if total == 0:
        total += n  # the package's "all strings are the exact same" case, kept as it is
    return round(total / n, 3)


def sentence_bleu(references: list[list[str]], hypothesis: list[str], max_n: int = 4) -> float:
    """nltk.translate.bleu_score.sentence_bleu with weights 1/max_n and
    SmoothingFunction().method1 (epsilon 0.1), as Texygen calls it."""
    return _bleu(
        [_counts(r, max_n) for r in references],
        [len(r) for r in references],
        _counts(hypothesis, max_n),
        len(hypothesis),
        max_n,
    )


def _counts(tokens: list[str], max_n: int) -> list[Counter]:
    """The n-gram counts of a token list for n = 1..max_n."""
    return [Counter(ngrams(tokens, n)) for n in range(1, max_n + 1)]


def _bleu(ref_counts, ref_lens, hyp_counts, hyp_len: int, max_n: int) -> float:
    """sentence_bleu from precomputed counts (each document's counted once per Self-BLEU)."""
    numerators, denominators = [], []
    for n in range(max_n):
        counts = hyp_counts[n]
        max_ref = dict.fromkeys(counts, 0)
        for rc in ref_counts:
            for g in counts:
                c = rc[n].get(g, 0)
                if c > max_ref[g]:
                    max_ref[g] = c
        numerators.append(sum(min(c, max_ref[g]) for g, c in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    if numerators[0] == 0:
        return 0.0
    ref_len = min(ref_lens, key=lambda r: (abs(r - hyp_len), r))
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    logs = [
        math.log((num if num else 0.1) / den)
        for num, den in zip(numerators, denominators, strict=True)
    ]
    return bp * math.exp(math.fsum(w * x for w, x in zip([1 / max_n] * max_n, logs, strict=True)))


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean over documents of the BLEU of each against all the others (Texygen's Self-BLEU,
    whitespace tokens; NaN for fewer than 2 documents)."""
    if len(texts) < 2:
        return float("nan")
    toks = [t.split() for t in texts]
    counts = [_counts(t, max_n) for t in toks]
    lens = [len(t) for t in toks]
    return math.fsum(
        _bleu(counts[:i] + counts[i + 1 :], lens[:i] + lens[i + 1 :], counts[i], lens[i], max_n)
        for i in range(len(toks))
    ) / len(toks)
