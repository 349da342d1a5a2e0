"""Read-only access to archives (docs/archive-format.md), with validation and chunk-aligned
streaming of logit rows in bounded memory.  No torch.

`Archive` checks the schema once on open and turns every way a file can be unusable (missing,
not HDF5, truncated, foreign schema, newer format_version) into one EngineError line.  Every
fact a caller needs is a named accessor here (callers never index the h5py objects), and
version-1 files read through the same accessors (what version 2 records explicitly is
derived from the root attributes and `run_key`).  `iter_rows` yields whole (1, k, vocab)
chunks with their (sample, step) coordinates for kernels to reduce: uncompressed chunks as
views of the file's pages (`chunks.Mapped`, no copy), compressed ones read through HDF5 with
the next chunks requested from the OS ahead of time (`chunks.Readahead`).  Reads that are not
streamed (single rows) go straight from the file into their arrays: no chunk cache for
uncompressed logits.
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from engine.archive import checksums, codecs
from engine.archive import format as F
from engine.archive.chunks import Mapped, Readahead, sources
from engine.archive.handle import FileHandle, open_h5
from engine.archive.text import Text
from engine.errors import EngineError

#: blocks whose chunks are requested from the OS before they are read (`Readahead`)
READAHEAD_BLOCKS = 8


@dataclass
class Block:
    """Stored rows of one chunk-aligned read: rows[i] is (sample, steps[i])."""

    sample: int
    steps: np.ndarray  # [rows] step index of each row (all < the sample's length)
    raw: np.ndarray  # [rows, vocab] as stored (float16/float32/uint16)
    scale: np.ndarray | None  # [rows] q16 only
    offset: np.ndarray | None  # [rows] q16 only


#: chunk cache for archives whose logits are compressed (16 MiB: several 1-4 MiB chunks)
FILTERED_CACHE = 16 << 20


def _filtered(ds: h5py.Dataset) -> bool:
    return not ds.is_virtual and ds.id.get_create_plist().get_nfilters() > 0


class LensView:
    """/models/<key>/lens (version 6): `view[name]` is the h5py dataset of one statistic of
    `format.LENS_STATS`, [sample, step, layer] (top-k ones [sample, step, layer, k]); rows at
    steps >= length and samples >= the group's n_complete are padding."""

    def __init__(self, group: h5py.Group):
        self.group = group
        a = group.attrs
        self.layers = np.asarray(a["layers"], dtype=np.int64)  # block indices, ascending
        self.n_layers = int(a["n_layers"])  # the model's depth (blocks)
        self.k = int(a["k"])
        self.convention = str(a["convention"])
        c = np.asarray(a[F.LENS_CHECK], dtype=np.float64)
        #: (max |lens at the last block - stored logits|, bound), None before the first batch
        self.check = None if np.isnan(c).any() else {"max_abs_diff": c[0], "bound": c[1]}

    def __getitem__(self, name: str) -> h5py.Dataset:
        if name not in F.LENS_STATS:
            raise KeyError(f"no lens statistic {name!r}; there are {', '.join(F.LENS_STATS)}")
        return self.group[name]


class LayerPairView:
    """/layer_pairs/<base>~<aligned> (version 6): `view[name]` is the dataset of one statistic
    of `format.LAYER_PAIR_STATS`, [sample, step, pair]; pair j compares block
    `layers_base[j]` of the base with block `layers_aligned[j]` of the aligned model."""

    def __init__(self, group: h5py.Group):
        self.group = group
        self.name = group.name.rsplit("/", 1)[-1]
        a = group.attrs
        self.base, self.aligned = str(a["base"]), str(a["aligned"])
        self.layers_base = np.asarray(a["layers_base"], dtype=np.int64)
        self.layers_aligned = np.asarray(a["layers_aligned"], dtype=np.int64)
        self.depth_base, self.depth_aligned = int(a["depth_base"]), int(a["depth_aligned"])
        self.pairing = str(a["pairing"])  # "layer" or "relative depth"
        self.n_complete, self.complete = int(a["n_complete"]), bool(a["complete"])
        self.key = json.loads(a["key"])

    def __getitem__(self, name: str) -> h5py.Dataset:
        if name not in F.LAYER_PAIR_STATS:
            raise KeyError(
                f"no layer-pair statistic {name!r}; there are {', '.join(F.LAYER_PAIR_STATS)}"
            )
        return self.group[name]


class ModelView:
    """One /models/<key> group."""

    def __init__(self, group: h5py.Group, archive: Archive):
        self.group = group
        self.key = group.name.rsplit("/", 1)[-1]
        for name in F.MODEL_REQUIRED:
            if name not in group:
                raise EngineError(
                    f"archive model group {self.key!r} lacks {name!r} "
                    f"(truncated or foreign archive)"
                )
        self.logits = group["logits"]  # [sample, step, vocab]
        self.codec = str(self.logits.attrs.get("codec", ""))
        if self.codec not in F.CODECS:
            raise EngineError(f"model {self.key!r} has unknown codec {self.codec!r}")
        attrs = {
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in group.attrs.items()
            if k != F.SELF_CHECK
        }  # an array: `self_check` reads it
        self.provenance = {
            k: v for k, v in attrs.items() if k not in F.GROUP_STATE and k != F.SCORE_KEY
        }
        root = archive.f.attrs
        # version 1: the generator group has no state of its own; the root's is its own
        self.n_complete = int(attrs.get("n_complete", root.get("n_complete", 0)))
        self.complete = bool(attrs.get("complete", root.get("complete", 0)))
        self.role = str(
            attrs.get("role", "generator" if self.key == archive.generator else "scored")
        )
        chat = attrs.get("chat_template", archive.run_key.get("chat_template", False))
        self.chat_template = bool(chat) if isinstance(chat, (bool, np.bool_, int)) else None
        self.score_key = json.loads(attrs[F.SCORE_KEY]) if F.SCORE_KEY in attrs else None

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    @property
    def self_check(self) -> dict | None:
        """The run's teacher-forced self-check (version 5): {sample, steps, max_abs_diff,
        bound} (sample index in this file, nats), or None when not recorded (NaN) or absent."""
        return F.read_self_check(self.group.attrs)

    @functools.cached_property
    def checksum_columns(self) -> list[str] | None:
        """Datasets (relative to the group) whose per-sample checksums the group holds, in the
        `checksums` dataset's column order; None for a group without them (before version 5)."""
        return checksums.columns(self.group)

    def checksums(self, n: int) -> np.ndarray:
        """[sample, column] uint64 stored checksums of samples 0..n-1."""
        return self.group[F.CHECKSUMS][:n]

    @property
    def window(self) -> float | None:
        return float(self.logits.attrs["window"]) if self.codec == "q16" else None

    @property
    def chunk_steps(self) -> int:
        """Steps per stored chunk (a merged archive's virtual logits: its shards' chunking)."""
        if self.logits.chunks:
            return int(self.logits.chunks[1])
        return int(self.logits.attrs.get(F.CHUNK_STEPS, max(1, self.logits.shape[1])))

    @functools.cached_property
    def storage_bytes(self) -> int:
        """Bytes the logits occupy on disk (a merged archive's virtual logits: in its shards)."""
        if not self.logits.is_virtual:
            return int(self.logits.id.get_storage_size())
        total = 0
        for *_, path, name in sources(self.logits):
            with open_h5(path, "r") as f:
                total += int(f[name].id.get_storage_size())
        return total

    @functools.cached_property
    def lens(self) -> LensView | None:
        """The logit lens's statistics (version 6, `lens=true`), or None."""
        g = self.group.get(F.LENS)
        return None if g is None else LensView(g)

    @functools.cached_property
    def activations(self) -> list[str]:
        grp = self.group.get(F.ACTIVATIONS)
        return [] if grp is None else list(grp)

    def vocab(self) -> np.ndarray:
        return self.group["vocab"].asstr()[()]

    @functools.cached_property
    def prompt_text(self) -> list[str]:
        """What this model read for each prompt (its chat template applied where it used one)."""
        return list(self.group["prompt_text"].asstr()[()])

    def prompt_tokens(self, prompt: int) -> list[int]:
        return [int(i) for i in self.group["prompt_tokens"][int(prompt)]]

    @functools.cached_property
    def text(self) -> Text:
        """Token ids -> text with this model's tokenizer record."""
        return Text(self.vocab(), self.group["tokenizer_json"].asstr()[()])

    def decode(self, raw, scale=None, offset=None) -> np.ndarray:
        return codecs.decode(self.codec, raw, scale, offset)

    def rows(self, sample: int, steps=slice(None)) -> np.ndarray:
        """Decoded float32 rows [step, vocab] of one sample (logits, or log-probs for q16)."""
        raw = self.logits[sample, steps]
        if self.codec == "q16":
            return self.decode(
                raw,
                self.group[F.LOGITS_SCALE][sample, steps],
                self.group[F.LOGITS_OFFSET][sample, steps],
            )
        return self.decode(raw)

    def block(self, sample: int, t0: int, t1: int, mapped: Mapped | None = None) -> Block:
        """Rows t0..t1 of one sample as stored (no decoding): a view of the file's pages when
        `mapped` can give one (uncompressed, within one chunk), else read through HDF5."""
        q16 = self.codec == "q16"
        raw = mapped.rows(sample, t0, t1) if mapped is not None else None
        return Block(
            sample=int(sample),
            steps=np.arange(t0, t1),
            raw=self.logits[sample, t0:t1] if raw is None else raw,
            scale=self.group[F.LOGITS_SCALE][sample, t0:t1] if q16 else None,
            offset=self.group[F.LOGITS_OFFSET][sample, t0:t1] if q16 else None,
        )


class Archive(FileHandle):
    def __init__(
        self, path: str | Path, *, allow_partial: bool = False, rdcc_nbytes: int | None = None
    ):
        """rdcc_nbytes: HDF5's chunk cache.  None: none for unfiltered logits (HDF5 then reads
        a selection straight from the file into the caller's array, about twice as fast as
        through the cache, whole chunks or single rows alike), FILTERED_CACHE when a group's
        logits are compressed (a chunk is then decompressed once, not once per row read)."""
        self.path = Path(path)
        self._samples: dict | None = None
        if not self.path.exists():
            raise EngineError(f"archive not found: {path}")
        if self.path.is_dir():
            raise EngineError(f"{path} is a directory, not an archive")
        self._open(0 if rdcc_nbytes is None else rdcc_nbytes)
        try:
            self._validate(allow_partial)
            if rdcc_nbytes is None and any(_filtered(m.logits) for m in self.models.values()):
                self.f.close()
                self._open(FILTERED_CACHE)
                self._validate(allow_partial)
        except Exception:
            self.f.close()
            raise

    def _open(self, rdcc_nbytes: int) -> None:
        try:
            self.f = open_h5(self.path, "r", rdcc_nbytes=rdcc_nbytes, rdcc_nslots=10007)
        except OSError as exc:
            reason = "truncated" if "truncated" in str(exc).lower() else "not an HDF5 file"
            raise EngineError(f"cannot read {self.path}: {reason} or damaged") from exc

    def _validate(self, allow_partial: bool) -> None:
        a = self.f.attrs
        if a.get("format") != F.FORMAT:
            raise EngineError(
                f"{self.path} is an HDF5 file but not a logit archive "
                f"(no format={F.FORMAT!r} attribute)"
            )
        version = int(a.get("format_version", -1))
        if version > F.FORMAT_VERSION:
            raise EngineError(
                f"{self.path} has format_version {version}; this engine reads "
                f"up to {F.FORMAT_VERSION}: upgrade the engine"
            )
        if version not in F.READABLE_VERSIONS:
            raise EngineError(f"{self.path} has an invalid format_version {version}")
        missing = [n for n in F.REQUIRED if n not in self.f]
        if missing or F.MODELS not in self.f or not len(self.f[F.MODELS]):
            raise EngineError(
                f"{self.path} lacks {missing or [F.MODELS]} (truncated or foreign archive)"
            )
        self.models = {k: ModelView(g, self) for k, g in self.f[F.MODELS].items()}
        self._check_sources()
        if not allow_partial and not self.complete:
            raise EngineError(
                f"{self.path} is incomplete ({self.n_complete} of {self.n_samples} "
                f"samples); finish it with `dump ... resume=true`"
            )

    def _check_sources(self) -> None:
        """A merged archive's virtual datasets read their shard files; HDF5 would silently
        return zeros for a missing one, so every shard must be where the merge left it (paths
        relative to this file) and have its recorded size."""
        here = Path(self.f.filename).parent
        sizes = {here / r["path"]: int(r["bytes"]) for r in self.merged_from}
        for m in self.models.values():
            if not m.logits.is_virtual:
                continue
            for path in {src[2] for src in sources(m.logits)}:
                if not path.is_file():
                    raise EngineError(
                        f"{self.path} is merged from shard files and {path} is "
                        f"missing (keep the shards next to it, or make a "
                        f"self-contained copy with `merge --copy`)"
                    )
                if path in sizes and path.stat().st_size != sizes[path]:
                    raise EngineError(
                        f"{self.path}: shard {path} changed since the merge "
                        f"({path.stat().st_size} bytes, merged at {sizes[path]})"
                    )

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
        return int(self.f[F.SAMPLES]["length"].shape[0])

    @property
    def max_new_tokens(self) -> int:
        return int(self.f[F.SAMPLES]["tokens"].shape[1])

    @property
    def samples_per_prompt(self) -> int:
        return int(self.f.attrs["samples_per_prompt"])

    @property
    def generator(self) -> str:
        return str(self.f.attrs.get("generator", next(iter(self.f[F.MODELS]))))

    @functools.cached_property
    def prompts(self) -> list[str]:
        return list(self.f[F.PROMPTS].asstr()[()])

    @functools.cached_property
    def run_key(self) -> dict:
        return json.loads(self.f.attrs.get("run_key", "{}"))

    @property
    def created(self) -> str:
        return str(self.f.attrs.get("created", ""))

    @property
    def git_commit(self) -> str:
        return str(self.f.attrs.get("git_commit", ""))

    @property
    def packages(self) -> dict:
        return json.loads(self.f.attrs.get("packages", "{}"))

    @functools.cached_property
    def shard(self) -> F.Shard | None:
        """A shard of a sharded dump (its sample i is the run's sample start + i), else None."""
        return F.Shard.read(self.f.attrs)

    @property
    def span(self) -> tuple[int, int]:
        """Global sample indices start, stop of this file's samples (a shard's share)."""
        return F.Shard.span(self.f.attrs, self.n_samples)

    @functools.cached_property
    def merged_from(self) -> list[dict]:
        """The shard records of a merged archive (`python -m engine merge`), else []."""
        return json.loads(self.f.attrs.get(F.MERGED_FROM, "[]"))

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def samples(self) -> dict[str, np.ndarray]:
        """Per-sample arrays of the complete samples (the first n_complete); read once and
        shared by every caller (read-only)."""
        if self._samples is None:
            n, s = self.n_complete, self.f[F.SAMPLES]
            self._samples = {name: s[name][:n] for name in F.SAMPLE_FIELDS}
            for v in self._samples.values():
                v.flags.writeable = False
        return self._samples

    def lineage(self) -> dict | None:
        """/lineage of a perturbation archive (see the spec), one entry per prompt, variant
        names decoded from the dataset's own enum; None for other archives."""
        if F.LINEAGE not in self.f:
            return None
        g = self.f[F.LINEAGE]
        names = {v: k for k, v in h5py.check_enum_dtype(g["variant"].dtype).items()}
        return {
            "parent_sample": g["parent_sample"][()],
            "cut": g["cut"][()],
            "variant": [names[int(v)] for v in g["variant"][()]],
            "edit": list(g["edit"].asstr()[()]),
            "control_prompt": g["control_prompt"][()],
            **{k: str(g.attrs.get(k, "")) for k in F.LINEAGE_ATTRS},
        }

    def answers(self) -> dict | None:
        """/answers of a candidate-answer archive (`python -m engine answers`): candidate
        texts, reference weights (None when the file gave none), terminator, source and prompt
        variant ("" when none, or for archives written before it was recorded); else None."""
        if F.ANSWERS not in self.f:
            return None
        g = self.f[F.ANSWERS]
        ref = g["reference"][()]
        return {
            "candidates": list(g["candidates"].asstr()[()]),
            "reference": None if np.isnan(ref).all() else ref,
            "terminator": str(g.attrs.get("terminator", "")),
            "source": str(g.attrs.get("source", "")),
            "prompt_variant": str(g.attrs.get("prompt_variant", "")),
        }

    @functools.cached_property
    def layer_pairs(self) -> dict[str, LayerPairView]:
        """Two models' lenses compared (version 6, `python -m engine layers`), by group name
        `<base>~<aligned>`."""
        g = self.f.get(F.LAYER_PAIRS)
        return {} if g is None else {n: LayerPairView(g[n]) for n in g}

    def model(self, key: str | None = None) -> ModelView:
        key = self.generator if key is None else key
        if key not in self.models:
            raise EngineError(f"archive has no model {key!r}; it has {', '.join(self.models)}")
        return self.models[key]

    # ---- streaming ----------------------------------------------------------------------
    def iter_rows(
        self, key: str | None = None, samples=None, steps_per_block: int | None = None
    ) -> Iterator[Block]:
        """Yield every stored row (step < length) of the chosen complete samples, one block of
        `steps_per_block` steps (default: the group's chunk, so reads are whole chunks) at a
        time: memory is one block plus its decoded form.  Uncompressed chunks are views of
        the file (`Mapped`); otherwise the chunks of the next READAHEAD_BLOCKS blocks are
        requested from the OS ahead of time (`Readahead`)."""
        m = self.model(key)
        n = min(self.n_complete, m.n_complete)
        lengths = self.samples()["length"][:n]
        chosen = range(n) if samples is None else samples
        k = steps_per_block or m.chunk_steps
        spans = (
            (int(s), t0, min(t0 + k, int(lengths[s])))
            for s in chosen
            for t0 in range(0, int(lengths[s]), k)
        )
        mapped = Mapped(m.logits, m.chunk_steps)
        if mapped.maps:  # paged in by the OS's own sequential readahead (advice only competed)
            try:
                for span in spans:
                    yield m.block(*span, mapped)
            finally:
                mapped.close()
            return
        ahead, pending = Readahead(m.logits, m.chunk_steps), collections.deque()
        try:
            for span in spans:
                pending.append(span)
                ahead(*span)
                if len(pending) > READAHEAD_BLOCKS:
                    yield m.block(*pending.popleft())
            while pending:
                yield m.block(*pending.popleft())
        finally:
            ahead.close()
