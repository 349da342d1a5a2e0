"""Archive writer: the HDF5 layout of docs/archive-format.md (format_version 1).

Crash safety.  The archive is written as `<out>.partial` and renamed atomically when complete.
Every dataset is created at its final size with early allocation, so the chunk index is
complete before the first sample is generated; afterwards the writer only writes raw data into
already-allocated chunks and rewrites one fixed-size attribute (`n_complete`) in place after
each batch has been written and flushed.  A process killed at any point (SIGKILL included)
therefore leaves a file whose metadata is the one from creation and whose first `n_complete`
samples are whole; `resume` continues from there.  (Durability against power loss is the
operating system's page cache's business; there is no fsync.)
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from engine import codecs
from engine.errors import EngineError
from engine.sampling import Step

FORMAT = "logit-archive"
FORMAT_VERSION = 1
FINISH_REASONS = {"length": 0, "eos": 1}
FINISH = h5py.enum_dtype(FINISH_REASONS, basetype="u1")
STR = h5py.string_dtype("utf-8")
VLEN_I32 = h5py.vlen_dtype(np.int32)
CHUNK_TARGET_BYTES = 2 << 20  # aim for 2 MiB chunks: inside the spec's 1-4 MiB band


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


def chunk_steps(vocab: int, itemsize: int, max_steps: int) -> int:
    """Steps per chunk: at most CHUNK_TARGET_BYTES per (1, k, vocab) chunk, and k spread so
    the chunks cover max_steps evenly (64 steps in 16+16+16+16, not 21+21+21+21 with 20 steps
    of the last chunk allocated for nothing)."""
    k0 = max(1, min(max_steps, CHUNK_TARGET_BYTES // max(1, vocab * itemsize)))
    n = -(-max(1, max_steps) // k0)  # chunks along the step axis
    return int(-(-max(1, max_steps) // n))


def _early(f, name, shape, dtype, chunks=None, **kw):
    """Dataset at its final size with every chunk allocated now (see module docstring)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, **kw)


def create(path: Path, *, run_key: dict, config_yaml: str, provenance_root: dict,
           prompts: Sequence[str], n_samples: int, max_new_tokens: int, model: ModelInfo,
           codec: str, window: float, capture_dims: dict[str, int]) -> "ArchiveWriter":
    """Create a new (partial) archive holding `len(prompts) * n_samples` empty samples."""
    n_prompts, total, steps = len(prompts), len(prompts) * n_samples, max_new_tokens
    f = h5py.File(path, "w")
    try:
        a = f.attrs
        a["format"], a["format_version"] = FORMAT, FORMAT_VERSION
        a["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        a["config_yaml"], a["run_key"] = config_yaml, json.dumps(run_key, sort_keys=True)
        for k, v in provenance_root.items():
            a[k] = v
        a["generator"], a["n_samples"], a["n_prompts"] = model.key, total, n_prompts
        a["samples_per_prompt"], a["max_new_tokens"] = n_samples, steps
        a["n_complete"], a["complete"] = np.int64(0), np.int8(0)
        f.create_dataset("prompts/text", data=np.array(list(prompts), dtype=object), dtype=STR)
        s = f.create_group("samples")
        s.create_dataset("prompt_index", data=np.repeat(np.arange(n_prompts, dtype=np.int32),
                                                        n_samples))
        tok_chunks = (1, max(1, steps))
        _early(s, "tokens", (total, steps), np.int32, chunks=tok_chunks if steps else None,
               fillvalue=-1)
        _early(s, "length", (total,), np.int32)
        _early(s, "finish_reason", (total,), FINISH)
        _early(s, "seed", (total,), np.uint64)
        add_model_group(f, model, total, steps, codec, window, capture_dims)
        f.flush()
    except Exception:
        f.close()
        path.unlink(missing_ok=True)
        raise
    return ArchiveWriter(f, model.key)


def add_model_group(f, model: ModelInfo, total, steps, codec, window, capture_dims=None):
    """Create /models/<key> at full size (every chunk allocated).  Its own `n_complete` and
    `complete` attributes record how many samples have rows (scored models fill them after
    the generator)."""
    g = f.create_group(f"models/{model.key}")
    for k, v in model.provenance.items():
        g.attrs[k] = v
    g.attrs["n_complete"], g.attrs["complete"] = np.int64(0), np.int8(0)
    g.create_dataset("prompt_text", data=np.array(list(model.prompt_text), dtype=object),
                     dtype=STR)
    pt = g.create_dataset("prompt_tokens", (len(model.prompt_tokens),), dtype=VLEN_I32)
    for i, ids in enumerate(model.prompt_tokens):
        pt[i] = np.asarray(ids, dtype=np.int32)
    g.create_dataset("vocab", data=np.array(list(model.vocab_strings), dtype=object), dtype=STR)
    g.create_dataset("tokenizer_json", data=model.tokenizer_json, dtype=STR)
    vocab, store = model.vocab_size, np.dtype(codecs.STORAGE_DTYPE[codec])
    k = chunk_steps(vocab, store.itemsize, steps)
    shape = (total, steps, vocab)  # [sample, step, vocab]
    lg = _early(g, "logits", shape, store, chunks=(1, k, vocab) if steps else None,
                fill_time="never")
    lg.attrs["codec"] = codec
    lg.attrs["dtype"] = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16",
                         "q16": "uint16"}[codec]
    if codec == "q16":
        lg.attrs["window"] = float(window)
        for name in ("logits_scale", "logits_offset"):
            _early(g, name, (total, steps), np.float32, chunks=(1, max(1, steps)))
    for hook, d in (capture_dims or {}).items():
        _early(g, f"activations/{hook}", (total, steps, d), np.float32,
               chunks=(1, max(1, steps), d), fill_time="never")


def open_for_resume(path: Path, run_key: dict) -> "ArchiveWriter":
    """Reopen a partial archive; refuse it if it was started with a different run."""
    try:
        f = h5py.File(path, "r+")
    except OSError as exc:
        raise EngineError(f"cannot resume: {path} is not a readable HDF5 file ({exc})") from exc
    stored = f.attrs.get("run_key")
    if f.attrs.get("format") != FORMAT or stored is None:
        f.close()
        raise EngineError(f"cannot resume: {path} is not a partial logit archive")
    if json.loads(stored) != json.loads(json.dumps(run_key, sort_keys=True)):
        old, new = json.loads(stored), run_key
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        f.close()
        raise EngineError(f"cannot resume {path}: it was started with different settings "
                          f"({', '.join(diff)}); use overwrite=true to start over")
    return ArchiveWriter(f, str(f.attrs["generator"]))


class ModelWriter:
    """Writes the rows of one model group: logits (encoded), q16 scales, activations."""

    def __init__(self, group: h5py.Group):
        self.g = group
        self.logits = group["logits"]  # [sample, step, vocab]
        self.codec = str(self.logits.attrs["codec"])
        self.window = float(self.logits.attrs.get("window", codecs.MIN_Q16_WINDOW))
        self.steps = int(self.logits.shape[1])
        grp = group.get("activations")
        self.acts = {} if grp is None else {n: grp[n] for n in _walk_datasets(grp)}

    @property
    def n_complete(self) -> int:
        return int(self.g.attrs["n_complete"])

    def write(self, s0: int, n: int, steps: Iterable[Step]) -> tuple[np.ndarray, np.ndarray]:
        """Consume one batch's steps for samples s0..s0+n, writing whole chunks as they fill.
        Returns (tokens [n, T] with -1 padding, length [n])."""
        T, V = self.steps, self.logits.shape[-1]
        k = self.logits.chunks[1] if self.logits.chunks else 1
        q16 = self.codec == "q16"
        buf = np.zeros((n, k, V), dtype=self.logits.dtype)  # [sample, step, vocab]: one chunk row each
        sbuf = np.zeros((2, n, T), dtype=np.float32) if q16 else None  # scale, offset
        acts = {name: np.zeros((n, T, ds.shape[-1]), np.float32) for name, ds in self.acts.items()}
        tokens = np.full((n, T), -1, dtype=np.int32)
        length = np.zeros(n, dtype=np.int32)
        t0 = 0
        for step in steps:
            data, scale, offset = codecs.encode(self.codec, step.logits, self.window)
            alive = step.alive.cpu().numpy()
            j = step.t - t0
            buf[:, j] = codecs.to_numpy(self.codec, data)
            buf[~alive, j] = 0  # rows past a sample's end are zero (spec: padding)
            if q16:
                sbuf[0, :, step.t] = scale.cpu().numpy() * alive
                sbuf[1, :, step.t] = offset.cpu().numpy() * alive
            for name, a in step.acts.items():
                acts[name][:, step.t] = a.float().cpu().numpy() * alive[:, None]
            tokens[alive, step.t] = step.tokens.cpu().numpy()[alive]
            length += alive
            if j == k - 1:
                self.logits[s0:s0 + n, t0:t0 + k] = buf
                buf[:] = 0
                t0 += k
        if t0 < int(length.max(initial=0)):
            self.logits[s0:s0 + n, t0:min(t0 + k, T)] = buf[:, :min(k, T - t0)]
        if q16:
            self.g["logits_scale"][s0:s0 + n] = sbuf[0]
            self.g["logits_offset"][s0:s0 + n] = sbuf[1]
        for name, ds in self.acts.items():
            ds[s0:s0 + n] = acts[name]
        return tokens, length

    def commit(self, n_complete: int) -> None:
        """Flush rows, then record them (in place, fixed size: see module docstring)."""
        self.g.file.flush()
        self.g.attrs.modify("n_complete", np.int64(n_complete))
        self.g.file.flush()

    def finish(self) -> None:
        self.g.attrs.modify("complete", np.int8(1))
        self.g.file.flush()


class ArchiveWriter:
    """Streams batches of generated samples into a created or reopened archive: the
    generator's rows (ModelWriter) plus the per-sample records, then the root commit."""

    def __init__(self, f: h5py.File, model_key: str):
        self.f = f
        self.rows = ModelWriter(f[f"models/{model_key}"])

    @property
    def n_complete(self) -> int:
        return int(self.f.attrs["n_complete"])

    def write_batch(self, s0: int, seeds: Sequence[int], steps: Iterable[Step],
                    eos_ids: Sequence[int]) -> None:
        n, T = len(seeds), self.rows.steps
        tokens, length = self.rows.write(s0, n, steps)
        last = tokens[np.arange(n), np.maximum(length - 1, 0)] if T else np.full(n, -1)
        ended = (length > 0) & np.isin(last, np.asarray(eos_ids, dtype=np.int32))
        samples = self.f["samples"]
        samples["tokens"][s0:s0 + n] = tokens
        samples["length"][s0:s0 + n] = length
        samples["finish_reason"][s0:s0 + n] = ended.astype(np.uint8)
        samples["seed"][s0:s0 + n] = np.asarray(seeds, dtype=np.uint64)
        self.rows.commit(s0 + n)
        self.f.flush()  # data and the group's record first ...
        self.f.attrs.modify("n_complete", np.int64(s0 + n))  # ... then the root commit
        self.f.flush()

    def finish(self) -> None:
        self.rows.finish()
        self.f.attrs.modify("complete", np.int8(1))
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _walk_datasets(grp) -> list[str]:
    """Relative names of all datasets below `grp` (hook names contain dots, not slashes)."""
    names: list[str] = []
    grp.visit(lambda n: names.append(n) if isinstance(grp[n], h5py.Dataset) else None)
    return names
