"""Token ids -> text for one model of an archive, from the tokenizer record the archive keeps
(tokenizer.json through the `tokenizers` library when present, else the per-id display
strings).  No model and no torch are loaded."""

from __future__ import annotations

import numpy as np


class Text:
    """`text(ids)` decodes a sequence exactly; `text.piece(id)` is one token's display string."""

    def __init__(self, vocab: np.ndarray, tokenizer_json: str):
        self.vocab = vocab
        self.tok = None
        if tokenizer_json:
            try:
                from tokenizers import Tokenizer

                self.tok = Tokenizer.from_str(tokenizer_json)
            except Exception:  # optional nicety; display strings are the fallback
                self.tok = None

    def __call__(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tok is not None:
            return self.tok.decode(ids, skip_special_tokens=False)
        return "".join(self.vocab[i] for i in ids)

    def piece(self, i: int) -> str:
        return self.vocab[int(i)]
