"""Read-only access to archives (docs/archive-format.md), with validation and chunk-aligned
streaming of logit rows in bounded memory.

`Archive` checks the schema once on open and turns every way a file can be unusable (missing,
not HDF5, truncated, foreign schema, newer format_version) into one EngineError line.
`iter_rows` reads whole (1, k, vocab) chunks through a chunk cache sized to hold one of them,
and yields them with their (sample, step) coordinates for kernels to reduce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from engine import codecs
from engine.archive import FORMAT, FORMAT_VERSION
from engine.errors import EngineError

REQUIRED = ("prompts/text", "samples/prompt_index", "samples/tokens", "samples/length",
            "samples/finish_reason", "samples/seed")
MODEL_REQUIRED = ("logits", "prompt_tokens", "prompt_text", "vocab")


@dataclass
class Block:
    """Decoded rows of one chunk-aligned read: rows[i] is (sample, steps[i])."""
    sample: int
    steps: np.ndarray  # [rows] step index of each row (all < the sample's length)
    raw: np.ndarray  # [rows, vocab] as stored (float16/float32/uint16)
    scale: np.ndarray | None  # [rows] q16 only
    offset: np.ndarray | None  # [rows] q16 only


class ModelView:
    """One /models/<key> group."""

    def __init__(self, group: h5py.Group):
        self.group = group
        self.key = group.name.rsplit("/", 1)[-1]
        for name in MODEL_REQUIRED:
            if name not in group:
                raise EngineError(f"archive model group {self.key!r} lacks {name!r} "
                                  f"(truncated or foreign archive)")
        self.logits = group["logits"]  # [sample, step, vocab]
        self.codec = str(self.logits.attrs.get("codec", ""))
        if self.codec not in codecs.CODECS:
            raise EngineError(f"model {self.key!r} has unknown codec {self.codec!r}")
        self.provenance = {k: (v.item() if hasattr(v, "item") else v)
                           for k, v in group.attrs.items() if k not in ("n_complete", "complete")}
        root = group.file.attrs
        # scored groups record their own progress; the generator's equals the root's
        self.n_complete = int(group.attrs.get("n_complete", root.get("n_complete", 0)))
        self.complete = bool(group.attrs.get("complete", root.get("complete", 0)))

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    def vocab(self) -> np.ndarray:
        return self.group["vocab"].asstr()[()]

    def decode(self, raw, scale=None, offset=None) -> np.ndarray:
        return codecs.decode(self.codec, raw, scale, offset)

    def rows(self, sample: int, steps=slice(None)) -> np.ndarray:
        """Decoded float32 rows [step, vocab] of one sample (logits, or log-probs for q16)."""
        raw = self.logits[sample, steps]
        if self.codec == "q16":
            return self.decode(raw, self.group["logits_scale"][sample, steps],
                               self.group["logits_offset"][sample, steps])
        return self.decode(raw)


class Archive:
    def __init__(self, path: str | Path, *, allow_partial: bool = False,
                 rdcc_nbytes: int = 16 << 20):
        self.path = Path(path)
        if not self.path.exists():
            raise EngineError(f"archive not found: {path}")
        if self.path.is_dir():
            raise EngineError(f"{path} is a directory, not an archive")
        try:
            self.f = h5py.File(self.path, "r", rdcc_nbytes=rdcc_nbytes, rdcc_nslots=10007)
        except OSError as exc:
            reason = "truncated" if "truncated" in str(exc).lower() else "not an HDF5 file"
            raise EngineError(f"cannot read {path}: {reason} or damaged") from exc
        try:
            self._validate(allow_partial)
        except Exception:
            self.f.close()
            raise

    def _validate(self, allow_partial: bool) -> None:
        a = self.f.attrs
        if a.get("format") != FORMAT:
            raise EngineError(f"{self.path} is an HDF5 file but not a logit archive "
                              f"(no format={FORMAT!r} attribute)")
        version = int(a.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise EngineError(f"{self.path} has format_version {version}; this engine reads "
                              f"up to {FORMAT_VERSION}: upgrade the engine")
        if version < 1:
            raise EngineError(f"{self.path} has an invalid format_version {version}")
        missing = [n for n in REQUIRED if n not in self.f]
        if missing or "models" not in self.f or not len(self.f["models"]):
            raise EngineError(f"{self.path} lacks {missing or ['models']} "
                              f"(truncated or foreign archive)")
        self.models = {k: ModelView(g) for k, g in self.f["models"].items()}
        if not allow_partial and not self.complete:
            raise EngineError(f"{self.path} is incomplete ({self.n_complete} of {self.n_samples} "
                              f"samples); finish it with `dump ... resume=true`")

    # ---- root facts -------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return int(self.f.attrs["format_version"])

    @property
    def complete(self) -> bool:
        return bool(self.f.attrs.get("complete", 0))

    @property
    def n_complete(self) -> int:
        return int(self.f.attrs.get("n_complete", 0))

    @property
    def n_samples(self) -> int:
        return int(self.f["samples/length"].shape[0])

    @property
    def max_new_tokens(self) -> int:
        return int(self.f["samples/tokens"].shape[1])

    @property
    def generator(self) -> str:
        return str(self.f.attrs.get("generator", next(iter(self.models))))

    @property
    def prompts(self) -> list[str]:
        return list(self.f["prompts/text"].asstr()[()])

    @property
    def run_key(self) -> dict:
        return json.loads(self.f.attrs.get("run_key", "{}"))

    def samples(self) -> dict[str, np.ndarray]:
        """Per-sample arrays of the complete samples (the first n_complete)."""
        n = self.n_complete
        s = self.f["samples"]
        return {"prompt_index": s["prompt_index"][:n], "tokens": s["tokens"][:n],
                "length": s["length"][:n], "finish_reason": s["finish_reason"][:n],
                "seed": s["seed"][:n]}

    def lineage(self) -> dict | None:
        """/lineage of a perturbation archive (see the spec), one entry per prompt, variant
        names decoded from the dataset's own enum; None for other archives."""
        if "lineage" not in self.f:
            return None
        g = self.f["lineage"]
        names = {v: k for k, v in h5py.check_enum_dtype(g["variant"].dtype).items()}
        return {"parent_sample": g["parent_sample"][()], "cut": g["cut"][()],
                "variant": [names[int(v)] for v in g["variant"][()]],
                "edit": list(g["edit"].asstr()[()]), "control_prompt": g["control_prompt"][()],
                "source_archive": str(g.attrs.get("source_archive", ""))}

    def model(self, key: str | None = None) -> ModelView:
        key = self.generator if key is None else key
        if key not in self.models:
            raise EngineError(f"archive has no model {key!r}; it has {', '.join(self.models)}")
        return self.models[key]

    # ---- streaming ----------------------------------------------------------------------
    def iter_rows(self, key: str | None = None, samples=None) -> Iterator[Block]:
        """Yield every stored row (step < length) of the chosen complete samples, one chunk
        (1, k, vocab) at a time: memory is one chunk plus its decoded form."""
        m = self.model(key)
        n = min(self.n_complete, m.n_complete)
        lengths = self.f["samples/length"][:n]
        chosen = range(n) if samples is None else samples
        k = m.logits.chunks[1] if m.logits.chunks else max(1, self.max_new_tokens)
        q16 = m.codec == "q16"
        for s in chosen:
            n = int(lengths[s])
            for t0 in range(0, n, k):
                t1 = min(t0 + k, n)
                yield Block(sample=int(s), steps=np.arange(t0, t1),
                            raw=m.logits[s, t0:t1],
                            scale=m.group["logits_scale"][s, t0:t1] if q16 else None,
                            offset=m.group["logits_offset"][s, t0:t1] if q16 else None)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
