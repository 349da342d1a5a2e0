"""Every name, constant and enum of docs/archive-format.md, in the spec's order.

The writer and the reader take the layout from here and nowhere else; a change to the layout
is a change to this file, to the spec, and (where old files read differently) a new
`FORMAT_VERSION` with a fixture of the old one under tests/data/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import h5py
import numpy as np

# the codec table (a numpy-only leaf: reading an archive still never imports torch),
# re-exported for the writer, the reader and the run layer's encoder
from kernels.codecs import CODECS, FP16_MAX, MIN_Q16_WINDOW, Q16_MAX_CODE, STORAGE_DTYPE  # noqa: F401

# ---- Root attributes ------------------------------------------------------------------------
FORMAT = "logit-archive"
FORMAT_VERSION = 6
#: versions this reader understands (1: generator group without n_complete/complete/role/
#: chat_template, which a version-1 reader derives from the root and run_key; 2: no
#: `nonfinite` finish reason, no device provenance; 3: no shards, merged archives or `host`;
#: 4: no per-sample checksums, no `self_check` slot)
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
ROOT_ATTRS = (
    "format",
    "format_version",
    "created",
    "config_yaml",
    "run_key",
    "packages",
    "git_commit",
    "generator",
    "n_prompts",
    "n_samples",
    "samples_per_prompt",
    "max_new_tokens",
    "n_complete",
    "complete",
)
#: version 4: the machine's host name
HOST = "host"
#: optional (sharded dumps, version 4): JSON {"index", "count", "start", "stop", "total"}: this file holds
#: samples start..stop-1 of a run of `total` samples split into `count` shards; absent otherwise
SHARD = "shard"


@dataclass(frozen=True)
class Shard:
    """The `shard` attribute: samples start..stop-1 (global indices) of a run of `total`
    samples, shard `index` of `count`."""

    index: int
    count: int
    start: int
    stop: int
    total: int

    def attr(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def read(cls, attrs) -> Shard | None:
        raw = attrs.get(SHARD)
        return None if raw is None else cls(**json.loads(raw))

    @staticmethod
    def span(attrs, n_samples: int) -> tuple[int, int]:
        """Global sample indices start, stop of a file's samples (a shard's share, else all)."""
        shard = Shard.read(attrs)
        return (0, n_samples) if shard is None else (shard.start, shard.stop)


#: optional (merged archives, version 4): JSON list, one record per shard merged in (index, path, bytes,
#: sha256, host, created, devices); per-sample datasets of merged-by-reference files are HDF5
#: virtual datasets over the shard files, at paths relative to the merged file
MERGED_FROM = "merged_from"
#: virtual logits carry their shards' chunking (a virtual dataset has none of its own)
CHUNK_STEPS = "chunk_steps"

# ---- Datasets -------------------------------------------------------------------------------
PROMPTS = "prompts/text"  # [P] str
SAMPLES = "samples"
SAMPLE_FIELDS = ("prompt_index", "tokens", "length", "finish_reason", "seed")
REQUIRED = (PROMPTS, *(f"{SAMPLES}/{n}" for n in SAMPLE_FIELDS))
MODELS = "models"
#: datasets every /models/<key> group MUST have
MODEL_REQUIRED = ("logits", "prompt_tokens", "prompt_text", "vocab", "tokenizer_json")
LOGITS_SCALE, LOGITS_OFFSET = "logits_scale", "logits_offset"  # q16 only, [S, T] float32
ACTIVATIONS = "activations"  # optional group: activations/<hook> [S, T, d] float32
#: version 5: /models/<key>/checksums [S, C] uint64: per sample, the xxh3_64 of the stored
#: bytes of steps [0, length) of each per-sample dataset named in its `columns` attribute
CHECKSUMS = "checksums"
CHECKSUM_ALGORITHM = "xxh3_64"  # attribute `algorithm`
CHECKSUM_OVER = "steps [0, length)"  # attribute `over`
CHECKSUM_COLUMNS = "columns"  # attribute: JSON list of dataset names relative to the group

#: version 6: optional /models/<key>/lens: the logit lens's statistics per [sample, step, layer]
#: (`lens=true` on dump, score, perturb); name -> (dtype, per-layer tail shape: () or ("k",))
LENS = "lens"
LENS_STATS = {
    "entropy": ("float32", ()),  # H(lens_l), nats
    "kl_final": ("float32", ()),  # KL(final || lens_l), nats (tuned-lens's forward_kl)
    "logp_token": ("float32", ()),  # log lens_l(stored token t), nats
    "rank_final_top": ("int32", ()),  # rank (1 = top) under lens_l of the final's argmax
    "topk_ids": ("int32", ("k",)),  # lens_l's k most probable ids, most probable first
    "topk_logp": ("float32", ("k",)),  # their log-probabilities, nats
}
LENS_CONVENTION = "resid_post"  # layer l = the output of block l (the last one: the model's)
#: attribute `check`, float64 [2]: (max |lens_last - logits|, bound) over the run, NaN until
#: the first batch; the run stops when the first exceeds the second
LENS_CHECK = "check"
#: version 6: optional /layer_pairs/<base>~<aligned>: two models' lenses compared per
#: [sample, step, layer pair] (`python -m engine layers`)
LAYER_PAIRS = "layer_pairs"
LAYER_PAIR_SEP = "~"
LAYER_PAIR_STATS = (
    "kl_base_aligned",  # KL(base_l || aligned_l), nats
    "kl_aligned_base",  # KL(aligned_l || base_l), nats
    "js",  # Jensen-Shannon divergence, nats
    "gamma",  # argmin_g KL(aligned_l || softmax(g log base_l)); NaN: unidentified
    "kl_at_gamma",  # KL(aligned_l || base_l^gamma), nats
)
PAIRINGS = ("layer", "relative depth")

#: /samples/finish_reason; nonfinite (version 3): the logits at step `length` were NaN/+inf or
#: had no finite entry, and the sample stopped there (on_nonfinite=record); that row is absent
FINISH_REASONS = {"length": 0, "eos": 1, "nonfinite": 2}
TOKEN_PAD = -1  # /samples/tokens at steps >= length

# ---- Model group attributes -----------------------------------------------------------------
#: progress and role; every group of a version-2 file has them
GROUP_STATE = ("n_complete", "complete", "role", "chat_template")
ROLES = ("generator", "scored")
SCORE_KEY = "score_key"  # scored groups: JSON of the scoring settings (resume must match)
#: version 5: float64 [4], NaN until the run records its teacher-forced self-check (rewritten
#: in place, fixed size, like n_complete): sample, steps compared, max |d log p| and the bound
#: (nats) above which the run stops
SELF_CHECK = "self_check"
SELF_CHECK_FIELDS = ("sample", "steps", "max_abs_diff", "bound")


def self_check_value(sample=np.nan, steps=np.nan, max_abs_diff=np.nan, bound=np.nan) -> np.ndarray:
    """The `self_check` attribute's value (all NaN: not recorded yet)."""
    return np.array([sample, steps, max_abs_diff, bound], dtype=np.float64)


def read_self_check(attrs) -> dict | None:
    """{sample, steps, max_abs_diff, bound} from a group's attributes; None when absent or not
    recorded (any NaN)."""
    raw = attrs.get(SELF_CHECK)
    if raw is None:
        return None
    v = np.asarray(raw, dtype=np.float64).ravel()
    if v.shape != (len(SELF_CHECK_FIELDS),) or np.isnan(v).any():
        return None
    sample, steps, diff, bound = v
    return {
        "sample": int(sample),
        "steps": int(steps),
        "max_abs_diff": float(diff),
        "bound": float(bound),
    }


#: perturbation archives: `<generator>@counterpart` holds every sample's tokens teacher-forced
#: by the generator after its pair partner's prompt (prompt p reads prompt p XOR 1); its
#: score_key has "counterpart": true
COUNTERPART_SUFFIX = "@counterpart"
#: provenance attributes a writer records (see "Provenance attributes of /models/<key>")
PROVENANCE = (
    "source",
    "name",
    "revision",
    "weights_sha256",
    "path",
    "tokenizer_name",
    "vocab_hash",
    "tokenizer_size",
    "vocab_size",
    "dtype",
    # version 3: where the logits were computed (CUDA adds cuda, cudnn, driver,
    # allow_tf32, bf16_reduced_reduction, fp16_reduced_reduction)
    "device",
    "device_name",
    "torch",
    "matmul_precision",
    "deterministic",
)

# ---- Perturbation lineage (optional /lineage) -----------------------------------------------
LINEAGE = "lineage"
VARIANTS = {"control": 0, "edit": 1, "fork": 2}
LINEAGE_FIELDS = ("parent_sample", "variant", "cut", "edit", "control_prompt")
LINEAGE_ATTRS = ("source_archive", "source_created", "source_generator")

# ---- Candidate answers (optional /answers) ---------------------------------------------------
ANSWERS = "answers"  # candidates [S] str (sample i = candidate i), reference [S] float64
# (weights, NaN: none); attrs terminator ("eos", "null" or the text), source, prompt_variant
# (the candidates file's variant name of the prompt, "" for none; absent before it was added)

# ---- Codecs ---------------------------------------------------------------------------------
# CODECS, STORAGE_DTYPE, FP16_MAX, Q16_MAX_CODE, MIN_Q16_WINDOW: imported above from
# `kernels.codecs`, the one codec table of the archive, the encoder and the kernels.
#: the logits dataset's `dtype` attribute per codec
DTYPE_ATTR = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16", "q16": "uint16"}

# ---- Chunking -------------------------------------------------------------------------------
CHUNK_TARGET_BYTES = 2 << 20  # aim for 2 MiB (1, k, V) chunks: inside the spec's 1-4 MiB band

# ---- HDF5 types -----------------------------------------------------------------------------
STR = h5py.string_dtype("utf-8")
VLEN_I32 = h5py.vlen_dtype(np.int32)
FINISH = h5py.enum_dtype(FINISH_REASONS, basetype="u1")
VARIANT = h5py.enum_dtype(VARIANTS, basetype="u1")


def checksum_columns(codec: str, hooks, lens: bool = False) -> list[str]:
    """Per-sample datasets of a model group that carry a checksum, in column order: logits,
    q16's scale and offset, every captured hook's activations, then the lens statistics."""
    q16 = [LOGITS_SCALE, LOGITS_OFFSET] if codec == "q16" else []
    stats = [f"{LENS}/{n}" for n in LENS_STATS] if lens else []
    return ["logits", *q16, *(f"{ACTIVATIONS}/{h}" for h in hooks), *stats]


def chunk_steps(vocab: int, itemsize: int, max_steps: int) -> int:
    """Steps per (1, k, vocab) chunk: at most CHUNK_TARGET_BYTES, and k spread so the chunks
    cover max_steps evenly (64 steps in 16+16+16+16, not 21+21+21+21 with 20 steps of the last
    chunk allocated for nothing)."""
    k0 = max(1, min(max_steps, CHUNK_TARGET_BYTES // max(1, vocab * itemsize)))
    n = -(-max(1, max_steps) // k0)  # chunks along the step axis
    return int(-(-max(1, max_steps) // n))
