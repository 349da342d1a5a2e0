"""Archive writer: the layout of docs/archive-format.md (names from `engine.archive.format`).

Input is neutral: every producer (sampling, teacher-forced scoring, perturbation) hands the
writer `Rows` (host numpy arrays, already encoded), one per generated step of a batch.

Crash safety.  The archive is written as `<out>.partial` and renamed atomically when complete
(by the run layer).  Every dataset is created at its final size with early allocation, so the
chunk index is complete before the first sample is generated; afterwards the writer only
writes raw data into already-allocated chunks and rewrites fixed-size attributes in place:
`n_complete` after each batch has been written and flushed, `self_check` once per run.  A process killed at
any point (SIGKILL included) therefore leaves a file whose metadata is the one from creation
and whose first `n_complete` samples are whole; `resume` continues from there.  (Durability
against power loss is the operating system's page cache's business; there is no fsync.)

Checksums.  Each group's `checksums` [sample, column] (`engine.archive.checksums`) is written
with the batch's rows, from the rows the writer already holds (no second pass over the data),
so a committed sample always has its checksum.  The `self_check` attribute is the other
fixed-size slot rewritten in place: the run's teacher-forced self-check, NaN until recorded.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from engine.archive import checksums
from engine.archive import format as F
from engine.archive.handle import FileHandle, open_h5
from engine.errors import EngineError


@dataclass
class ModelInfo:
    """What the archive records about one model (its group under /models)."""

    key: str
    provenance: dict
    vocab_size: int
    prompt_text: Sequence[str]  # what the model read for each prompt (chat template applied)
    prompt_tokens: Sequence[Sequence[int]]
    vocab_strings: Sequence[str]  # display string of every token id, length vocab_size
    tokenizer_json: str  # the fast tokenizer's tokenizer.json ("" if none)
    chat_template: bool = False  # whether the model read the prompts through its template
    role: str = "generator"  # or "scored"
    score_key: str | None = None  # scored groups: JSON of the scoring settings


@dataclass
class Rows:
    """One step `t` of a batch, encoded and on the host: what every producer hands the writer."""

    t: int
    data: np.ndarray  # [batch, vocab] in the codec's storage dtype
    tokens: np.ndarray  # [batch] token of this step (sampled, or the stored one when scoring)
    alive: np.ndarray  # [batch] bool: the sample had not ended before this step
    scale: np.ndarray | None = None  # [batch] q16 only
    offset: np.ndarray | None = None  # [batch] q16 only
    acts: dict = field(default_factory=dict)  # hook -> [batch, d] float32
    #: dataset relative to the group -> [batch, ...] (the lens statistics, `lens/<name>`)
    extras: dict = field(default_factory=dict)
    nonfinite: np.ndarray | None = None  # [batch] bool: the sample ends here, logits non-finite


def _early(f, name, shape, dtype, chunks=None, **kw):
    """Dataset at its final size with every chunk allocated now (see module docstring)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, **kw)


def create(
    path: Path,
    *,
    run_key: dict,
    config_yaml: str,
    provenance_root: dict,
    prompts: Sequence[str],
    n_samples: int,
    max_new_tokens: int,
    model: ModelInfo,
    codec: str,
    window: float,
    capture_dims: dict[str, int],
    shard: F.Shard | None = None,
    lens: dict | None = None,
) -> ArchiveWriter:
    """Create a new (partial) archive holding `len(prompts) * n_samples` empty samples, or
    only `shard`'s share of them (its sample i is the run's sample shard.start + i)."""
    n_prompts, total, steps = len(prompts), len(prompts) * n_samples, max_new_tokens
    span = slice(0, total) if shard is None else slice(shard.start, shard.stop)
    total = span.stop - span.start
    f = open_h5(path, "w")
    try:
        a = f.attrs
        a["format"], a["format_version"] = F.FORMAT, F.FORMAT_VERSION
        a["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        a["config_yaml"], a["run_key"] = config_yaml, json.dumps(run_key, sort_keys=True)
        for k, v in provenance_root.items():
            a[k] = v
        a["generator"], a["n_samples"], a["n_prompts"] = model.key, total, n_prompts
        a["samples_per_prompt"], a["max_new_tokens"] = n_samples, steps
        a["n_complete"], a["complete"] = np.int64(0), np.int8(0)
        if shard is not None:
            a[F.SHARD] = shard.attr()
        f.create_dataset(F.PROMPTS, data=np.array(list(prompts), dtype=object), dtype=F.STR)
        s = f.create_group(F.SAMPLES)
        s.create_dataset(
            "prompt_index", data=np.repeat(np.arange(n_prompts, dtype=np.int32), n_samples)[span]
        )
        tok_chunks = (1, max(1, steps))
        _early(
            s,
            "tokens",
            (total, steps),
            np.int32,
            chunks=tok_chunks if steps else None,
            fillvalue=F.TOKEN_PAD,
        )
        _early(s, "length", (total,), np.int32)
        _early(s, "finish_reason", (total,), F.FINISH)
        _early(s, "seed", (total,), np.uint64)
        add_model_group(f, model, total, steps, codec, window, capture_dims, lens)
        f.flush()
    except Exception:
        f.close()
        path.unlink(missing_ok=True)
        raise
    return ArchiveWriter(f, model.key)


def add_model_group(
    f, model: ModelInfo, total, steps, codec, window, capture_dims=None, lens: dict | None = None
):
    """Create /models/<key> at full size (every chunk allocated).  Its own `n_complete` and
    `complete` attributes record how many samples have rows; its `checksums` hold each
    committed sample's digests and `self_check` (NaN until recorded) the run's self-check.
    `lens`: {layers, n_layers, k} of the logit lens's statistics (`/lens`, version 6)."""
    if model.role not in F.ROLES:
        raise ValueError(f"role must be one of {F.ROLES}, got {model.role!r}")
    g = f.create_group(f"{F.MODELS}/{model.key}")
    for k, v in model.provenance.items():
        g.attrs[k] = v
    g.attrs["n_complete"], g.attrs["complete"] = np.int64(0), np.int8(0)
    g.attrs["role"], g.attrs["chat_template"] = model.role, bool(model.chat_template)
    g.attrs[F.SELF_CHECK] = F.self_check_value()  # NaN until recorded; fixed size: see module
    if model.score_key is not None:
        g.attrs[F.SCORE_KEY] = model.score_key
    g.create_dataset(
        "prompt_text", data=np.array(list(model.prompt_text), dtype=object), dtype=F.STR
    )
    pt = g.create_dataset("prompt_tokens", (len(model.prompt_tokens),), dtype=F.VLEN_I32)
    for i, ids in enumerate(model.prompt_tokens):
        pt[i] = np.asarray(ids, dtype=np.int32)
    g.create_dataset("vocab", data=np.array(list(model.vocab_strings), dtype=object), dtype=F.STR)
    g.create_dataset("tokenizer_json", data=model.tokenizer_json, dtype=F.STR)
    vocab, store = model.vocab_size, np.dtype(F.STORAGE_DTYPE[codec])
    k = F.chunk_steps(vocab, store.itemsize, steps)
    shape = (total, steps, vocab)  # [sample, step, vocab]
    lg = _early(
        g, "logits", shape, store, chunks=(1, k, vocab) if steps else None, fill_time="never"
    )
    lg.attrs["codec"], lg.attrs["dtype"] = codec, F.DTYPE_ATTR[codec]
    if codec == "q16":
        lg.attrs["window"] = float(window)
        for name in (F.LOGITS_SCALE, F.LOGITS_OFFSET):
            _early(g, name, (total, steps), np.float32, chunks=(1, max(1, steps)))
    for hook, d in (capture_dims or {}).items():
        _early(
            g,
            f"{F.ACTIVATIONS}/{hook}",
            (total, steps, d),
            np.float32,
            chunks=(1, max(1, steps), d),
            fill_time="never",
        )
    if lens is not None:
        add_lens_group(g, total, steps, lens)
    columns = F.checksum_columns(codec, capture_dims or {}, lens is not None)
    checksums.create(g, total, columns, _early)
    return g


def add_lens_group(g, total: int, steps: int, lens: dict) -> None:
    """/models/<key>/lens: one [sample, step, layer(, k)] dataset per `format.LENS_STATS`."""
    lg = g.create_group(F.LENS)
    layers = np.asarray(lens["layers"], dtype=np.int32)
    lg.attrs["layers"], lg.attrs["n_layers"] = layers, np.int64(lens["n_layers"])
    lg.attrs["k"], lg.attrs["convention"] = np.int64(lens["k"]), F.LENS_CONVENTION
    lg.attrs[F.LENS_CHECK] = np.full(2, np.nan)  # fixed size: rewritten in place
    for name, (dtype, tail) in F.LENS_STATS.items():
        shape = (total, steps, len(layers), *(int(lens["k"]) for _ in tail))
        _early(lg, name, shape, dtype, chunks=(1, max(1, steps), *shape[2:]), fill_time="never")


def _write_lineage(f: h5py.File, records: Sequence[dict], source: Path, source_attrs: dict) -> None:
    """/lineage of a perturbation archive: records have parent, variant, cut, edit; prompts
    come in (control, variant) pairs, so each one's matched control is the even index."""
    g = f.create_group(F.LINEAGE)
    g.attrs["source_archive"] = str(source)
    g.attrs["source_created"] = str(source_attrs.get("created", ""))
    g.attrs["source_generator"] = str(source_attrs.get("generator", ""))
    g.create_dataset("parent_sample", data=np.array([r["parent"] for r in records], np.int32))
    g.create_dataset(
        "variant",
        data=np.array([F.VARIANTS[r["variant"]] for r in records], np.uint8),
        dtype=F.VARIANT,
    )
    g.create_dataset("cut", data=np.array([r["cut"] for r in records], np.int32))
    g.create_dataset("edit", data=np.array([r["edit"] for r in records], dtype=object), dtype=F.STR)
    g.create_dataset("control_prompt", data=(np.arange(len(records)) // 2 * 2).astype(np.int32))


def _write_answers(
    f: h5py.File,
    candidates: Sequence[str],
    reference,
    terminator,
    source: str,
    prompt_variant: str = "",
) -> None:
    """/answers of a candidate-answer archive: sample i is candidate i."""
    g = f.create_group(F.ANSWERS)
    g.create_dataset("candidates", data=np.array(list(candidates), dtype=object), dtype=F.STR)
    ref = (
        np.full(len(candidates), np.nan) if reference is None else np.asarray(reference, np.float64)
    )
    g.create_dataset("reference", data=ref)
    g.attrs["terminator"] = "null" if terminator is None else str(terminator)
    g.attrs["source"] = source
    g.attrs["prompt_variant"] = prompt_variant


def open_for_resume(path: Path, run_key: dict) -> ArchiveWriter:
    """Reopen a partial archive; refuse it if it was started with a different run."""
    try:
        f = open_h5(path, "r+")
    except OSError as exc:
        raise EngineError(f"cannot resume: {path} is not a readable HDF5 file ({exc})") from exc
    stored = f.attrs.get("run_key")
    if f.attrs.get("format") != F.FORMAT or stored is None:
        f.close()
        raise EngineError(f"cannot resume: {path} is not a partial logit archive")
    if int(f.attrs.get("format_version", 0)) != F.FORMAT_VERSION:
        f.close()
        raise EngineError(
            f"cannot resume {path}: it was written as format_version "
            f"{int(f.attrs.get('format_version', 0))} by an older engine; "
            f"use overwrite=true to start over"
        )
    if json.loads(stored) != json.loads(json.dumps(run_key, sort_keys=True)):
        old, new = json.loads(stored), run_key
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        f.close()
        raise EngineError(
            f"cannot resume {path}: it was started with different settings "
            f"({', '.join(diff)}); use overwrite=true to start over"
        )
    return ArchiveWriter(f, str(f.attrs["generator"]))


def open_scored_group(
    path: Path,
    model: ModelInfo,
    *,
    codec: str,
    window: float,
    resume: bool,
    overwrite: bool,
    lens: dict | None = None,
) -> tuple[ModelWriter, bool]:
    """(writer for /models/<key>, resuming) in an existing complete archive: continue a partial
    group whose score_key matches (resume), replace one (overwrite), or create it."""
    f = open_h5(path, "r+")
    try:
        key, total, steps = (
            model.key,
            f[F.SAMPLES]["length"].shape[0],
            f[F.SAMPLES]["tokens"].shape[1],
        )
        g = f.get(f"{F.MODELS}/{key}")
        resuming = False
        if g is not None:
            if overwrite:
                del f[f"{F.MODELS}/{key}"]
            elif bool(g.attrs.get("complete", 0)):
                raise EngineError(
                    f"the archive already has model {key!r}; pass overwrite=true to replace it"
                )
            elif not resume:
                raise EngineError(
                    f"model {key!r} was partly scored ({int(g.attrs['n_complete'])}"
                    f" samples): pass resume=true to continue or overwrite=true "
                    f"to restart"
                )
            elif json.loads(g.attrs.get(F.SCORE_KEY, "{}")) != json.loads(model.score_key or "{}"):
                raise EngineError(
                    f"cannot resume scoring {key!r}: it was started with different "
                    f"settings; use overwrite=true"
                )
            else:
                resuming = True
        if not resuming:
            add_model_group(f, model, total, steps, codec, window, lens=lens)
            f.flush()
        return ModelWriter(f[f"{F.MODELS}/{key}"], owns_file=True), resuming
    except BaseException:
        f.close()
        raise


class ModelWriter(FileHandle):
    """Writes the rows of one model group: logits (encoded), q16 scales, activations, and
    each sample's checksums of them; records the run's self-check."""

    def __init__(self, group: h5py.Group, owns_file: bool = False):
        self.g = group
        self.f = group.file if owns_file else None  # closed with the writer only if it owns it
        self.logits = group["logits"]  # [sample, step, vocab]
        self.codec = str(self.logits.attrs["codec"])
        self.steps = int(self.logits.shape[1])
        grp = group.get(F.ACTIVATIONS)
        self.acts = {} if grp is None else {n: grp[n] for n in _walk_datasets(grp)}
        lens = group.get(F.LENS)
        #: per-step datasets besides logits and activations, by name relative to the group
        self.extras = {} if lens is None else {f"{F.LENS}/{n}": lens[n] for n in F.LENS_STATS}
        #: column names of `checksums` (None: a group of an older file, resumed, has none)
        self.columns = checksums.columns(group)
        #: hash the rows as they are written (bench/verify.py turns it off to time the cost)
        self.hashing = self.columns is not None

    @property
    def n_complete(self) -> int:
        return int(self.g.attrs["n_complete"])

    def write(self, s0: int, n: int, steps: Iterable[Rows]) -> tuple[np.ndarray, np.ndarray]:
        """Consume one batch's rows for samples s0..s0+n, writing whole chunks as they fill.
        Returns (tokens [n, T] with -1 padding, length [n], ended on non-finite logits [n])."""
        T, V = self.steps, self.logits.shape[-1]
        k = self.logits.chunks[1] if self.logits.chunks else 1
        q16 = self.codec == "q16"
        buf = np.zeros(
            (n, k, V), dtype=self.logits.dtype
        )  # [sample, step, vocab]: one chunk row each
        sbuf = np.zeros((2, n, T), dtype=np.float32) if q16 else None  # scale, offset
        acts = {name: np.zeros((n, T, ds.shape[-1]), np.float32) for name, ds in self.acts.items()}
        extras = {name: np.zeros((n, *ds.shape[1:]), ds.dtype) for name, ds in self.extras.items()}
        tokens = np.full((n, T), F.TOKEN_PAD, dtype=np.int32)
        length = np.zeros(n, dtype=np.int32)
        nonfinite = np.zeros(n, dtype=bool)
        hashers = [checksums.stream() for _ in range(n)] if self.hashing else None
        t0 = delivered = 0
        for row in steps:
            if row.nonfinite is not None:
                nonfinite |= row.nonfinite
            alive = np.asarray(row.alive, dtype=bool)
            j = row.t - t0
            buf[:, j] = row.data
            buf[~alive, j] = 0  # rows past a sample's end are zero (spec: padding)
            if hashers is not None:  # the stored row, hashed while it is still in cache
                for i in np.flatnonzero(alive):
                    hashers[i].update(buf[i, j])
            if q16:
                sbuf[0, :, row.t] = row.scale * alive
                sbuf[1, :, row.t] = row.offset * alive
            for name, a in row.acts.items():
                acts[name][:, row.t] = a * alive[:, None]
            for name, a in row.extras.items():
                extras[name][:, row.t] = a
                extras[name][~alive, row.t] = 0
            tokens[alive, row.t] = np.asarray(row.tokens)[alive]
            length += alive
            delivered = row.t + 1
            if j == k - 1:  # every row of buf was just written: no zeroing pass between chunks
                self.logits[s0 : s0 + n, t0 : t0 + k] = buf
                t0 += k
        if t0 < int(length.max(initial=0)):
            buf[:, delivered - t0 :] = 0  # steps no sample reached: padding
            self.logits[s0 : s0 + n, t0 : min(t0 + k, T)] = buf[:, : min(k, T - t0)]
        if q16:
            self.g[F.LOGITS_SCALE][s0 : s0 + n] = sbuf[0]
            self.g[F.LOGITS_OFFSET][s0 : s0 + n] = sbuf[1]
        for name, ds in self.acts.items():
            ds[s0 : s0 + n] = acts[name]
        for name, ds in self.extras.items():
            ds[s0 : s0 + n] = extras[name]
        if hashers is not None:
            held = {F.ACTIVATIONS + "/" + name: a for name, a in acts.items()} | extras
            if q16:
                held[F.LOGITS_SCALE], held[F.LOGITS_OFFSET] = sbuf[0], sbuf[1]
            self.g[F.CHECKSUMS][s0 : s0 + n] = self._digests(hashers, held, length)
        return tokens, length, nonfinite

    def _digests(self, hashers, held: dict, length: np.ndarray) -> np.ndarray:
        """[sample, column] uint64 checksums of one batch: the logits' streamed hashers, and
        every other column's held [sample, step, ...] rows hashed up to the sample's length."""
        out = np.empty((len(length), len(self.columns)), dtype=np.uint64)
        for i, n in enumerate(length):
            for c, name in enumerate(self.columns):
                out[i, c] = (
                    hashers[i].intdigest()
                    if name == "logits"
                    else checksums.digest(held[name][i, :n])
                )
        return out

    def record_self_check(self, sample: int, steps: int, max_abs_diff: float, bound: float) -> None:
        """Record the run's teacher-forced self-check (sample index in this file, steps
        compared, max |d log p| in nats, the bound it was held to) in the group's fixed-size
        `self_check` slot, in place like `n_complete`, and flush."""
        self.g.attrs.modify(F.SELF_CHECK, F.self_check_value(sample, steps, max_abs_diff, bound))
        self.g.file.flush()

    def record_lens_check(self, max_abs_diff: float, bound: float) -> None:
        """The lens invariant's worst (difference, bound) over the run, kept with the worst
        already recorded (a resumed run), in place; flushed."""
        g = self.g[F.LENS]
        old = np.asarray(g.attrs[F.LENS_CHECK], dtype=np.float64)
        new = np.array([max_abs_diff, bound])
        if not np.isnan(old).any():
            new = np.maximum(old, new)
        g.attrs.modify(F.LENS_CHECK, new)
        self.g.file.flush()

    def self_check_failed(self) -> bool:
        """Whether the recorded self-check exceeded its bound."""
        c = F.read_self_check(self.g.attrs)
        return c is not None and c["max_abs_diff"] > c["bound"]

    def commit(self, n_complete: int) -> None:
        """Flush rows, then record them (in place, fixed size: see module docstring)."""
        self.g.file.flush()
        self.g.attrs.modify("n_complete", np.int64(n_complete))
        self.g.file.flush()

    def finish(self) -> None:
        self.g.attrs.modify("complete", np.int8(1))
        self.g.file.flush()


class ArchiveWriter(FileHandle):
    """Streams batches of generated samples into a created or reopened archive: the
    generator's rows (ModelWriter) plus the per-sample records, then the root commit."""

    def __init__(self, f: h5py.File, model_key: str):
        self.f = f
        self.rows = ModelWriter(f[f"{F.MODELS}/{model_key}"])

    @property
    def n_complete(self) -> int:
        return int(self.f.attrs["n_complete"])

    def write_lineage(self, records: Sequence[dict], source: Path, source_attrs: dict) -> None:
        """/lineage of a perturbation archive (before its first batch), flushed."""
        _write_lineage(self.f, records, source, source_attrs)
        self.f.flush()

    def write_answers(
        self, candidates: Sequence[str], reference, terminator, source: str, prompt_variant=""
    ) -> None:
        """/answers of a candidate-answer archive (before its first batch), flushed."""
        _write_answers(self.f, candidates, reference, terminator, source, prompt_variant)
        self.f.flush()

    def span(self, total: int) -> tuple[int, int]:
        """Global sample indices start, stop of this file (a shard's, else 0, total)."""
        return F.Shard.span(self.f.attrs, total)

    def write_batch(
        self, s0: int, seeds: Sequence[int], steps: Iterable[Rows], eos_ids: Sequence[int]
    ) -> None:
        n, T = len(seeds), self.rows.steps
        tokens, length, nonfinite = self.rows.write(s0, n, steps)
        last = tokens[np.arange(n), np.maximum(length - 1, 0)] if T else np.full(n, -1)
        ended = (length > 0) & np.isin(last, np.asarray(eos_ids, dtype=np.int32))
        samples = self.f[F.SAMPLES]
        samples["tokens"][s0 : s0 + n] = tokens
        samples["length"][s0 : s0 + n] = length
        reason = np.where(ended, F.FINISH_REASONS["eos"], F.FINISH_REASONS["length"])
        reason = np.where(nonfinite, F.FINISH_REASONS["nonfinite"], reason)
        samples["finish_reason"][s0 : s0 + n] = reason.astype(np.uint8)
        samples["seed"][s0 : s0 + n] = np.asarray(seeds, dtype=np.uint64)
        self.rows.commit(s0 + n)
        self.f.flush()  # data and the group's record first ...
        self.f.attrs.modify("n_complete", np.int64(s0 + n))  # ... then the root commit
        self.f.flush()

    def finish(self) -> None:
        self.rows.finish()
        self.f.attrs.modify("complete", np.int8(1))
        self.f.flush()


def _walk_datasets(grp) -> list[str]:
    """Relative names of all datasets below `grp` (hook names contain dots, not slashes)."""
    names: list[str] = []
    grp.visit(lambda n: names.append(n) if isinstance(grp[n], h5py.Dataset) else None)
    return names
