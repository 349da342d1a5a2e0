"""What the archive-writing verbs share besides the output lifecycle (`engine.runtime.output`)
and the batch schedule (`engine.runtime.schedule`): resolving the device and batch size,
loading the model, reading prompts the model's way, what an archive records about a model,
the tokenizer rule, the self-check of the first batch and the sampling loop itself.

Every function takes typed settings (`engine.runtime.settings`), never a config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import archive
from engine.archive import format as F
from engine.errors import EngineError
from engine.runtime.lens import Lens
from engine.runtime.models import LoadedModel, load_model, resolve_device
from engine.runtime.overlap import overlapped, to_host
from engine.runtime.prompts import render, uses_chat_template
from engine.runtime.provenance import root_provenance, tokenizer_record
from engine.runtime.sampling import (
    NonFiniteLogits,
    generate,
    prompt_groups,
    row_prompt,
    sample_seed,
)
from engine.runtime.schedule import fill, straddles
from engine.runtime.selfcheck import SelfCheck, enforce, run_check
from engine.runtime.settings import Codec, ModelSpec, RunSettings, Sampling, Shape

log = logging.getLogger(__name__)


# ---- device and batch size ---------------------------------------------------------------------
#: batch_size=auto by device.  CPU (2 cores, SmolLM2-135M, one decode step with its host copy):
#: 22.6 ms per row in batches of 4, 13.1 in 8, 4.2 in 32, 3.1 in 64; on a GPU 32 rows keep a
#: 7B model's forward compute-bound while [32, vocab] float32 rows stay ~20 MB per step
AUTO_BATCH = {"cpu": 32, "cuda": 32}


def resolve_batch_size(run: RunSettings) -> RunSettings:
    """batch_size=auto resolved by device."""
    if run.batch_size == "auto":
        return run.with_(batch_size=AUTO_BATCH.get(resolve_device(run.device).type, 8))
    return run


def device_type(device: str) -> str:
    """cpu or cuda: part of a sampled archive's run key, since logits (not the draws: see
    `engine.runtime.sampling`) differ in their last bits between devices."""
    return resolve_device(device).type


def shard_device(run: RunSettings, shard: archive.Shard | None) -> RunSettings:
    """device=auto or cuda (no index) in a sharded dump that sees several GPUs (one machine,
    no scheduler isolating them) takes GPU shard % count; under SLURM each job sees one GPU.
    An explicit cuda:N is left alone."""
    if shard is not None and run.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return run.with_(device=f"cuda:{shard.index % torch.cuda.device_count()}")
    return run


def create_archive(
    partial: Path,
    key: dict,
    shape: Shape,
    prompts: list[str],
    info: archive.ModelInfo,
    codec: Codec,
    dims: dict | None = None,
    shard: archive.Shard | None = None,
    lens: Lens | None = None,
) -> archive.ArchiveWriter:
    """A fresh partial archive of the run's samples (or `shard`'s share of them); `lens`:
    with the logit lens's statistics."""
    return archive.create(
        partial,
        run_key=key,
        config_yaml=shape.config_yaml,
        provenance_root=root_provenance(),
        prompts=prompts,
        n_samples=shape.n_samples,
        max_new_tokens=shape.max_new_tokens,
        model=info,
        codec=codec.codec,
        window=codec.window,
        capture_dims=dims or {},
        shard=shard,
        lens=None if lens is None else lens.layout(),
    )


# ---- models and prompts ------------------------------------------------------------------------
def load(spec: ModelSpec, run: RunSettings, model: LoadedModel | None = None) -> LoadedModel:
    """The configured model, or `model` when the caller already loaded one (tests, benches)."""
    if model is not None:
        return model
    if run.deterministic:
        make_deterministic()
    return load_model(spec, run.device, run.cache_dir, run.device_map, run.deterministic)


def make_deterministic() -> None:
    """Bit-reproducible GPU runs (same device, driver, batch size): deterministic torch
    algorithms and a fixed cuBLAS workspace (must be set before CUDA's first use)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


@dataclass
class Rendered:
    """How one model reads a prompt set."""

    chat_template: bool  # the decision, after `auto` is resolved
    text: list[str]  # what it reads, per prompt
    ids: list[list[int]]  # its token ids, per prompt


def read_prompts(lm: LoadedModel, prompts: list[str], chat_template) -> Rendered:
    chat = uses_chat_template(lm.tokenizer, chat_template)  # `auto` resolved once
    seen = [render(lm.tokenizer, p, chat) for p in prompts]
    return Rendered(chat, [t for t, _ in seen], [i for _, i in seen])


def model_info(lm: LoadedModel, r: Rendered, **kw) -> archive.ModelInfo:
    """What an archive records about a loaded model that read these prompts."""
    strings, tok_json = tokenizer_record(lm.tokenizer, lm.vocab_size)
    return archive.ModelInfo(
        key=lm.key,
        provenance=dict(lm.provenance),
        vocab_size=lm.vocab_size,
        prompt_text=r.text,
        prompt_tokens=r.ids,
        vocab_strings=strings,
        tokenizer_json=tok_json,
        chat_template=r.chat_template,
        **kw,
    )


def check_tokenizer(archive_prov: dict, lm: LoadedModel, allow: bool = False) -> None:
    """The one compatibility rule: same vocabulary hash and logit width, or `allow`."""
    prov = lm.provenance
    same = archive_prov.get("vocab_hash") == prov["vocab_hash"] and int(
        archive_prov.get("vocab_size", -1)
    ) == int(prov["vocab_size"])
    if not same and not allow:
        raise EngineError(
            f"tokenizer mismatch: archive {archive_prov.get('tokenizer_name')} (vocab "
            f"{archive_prov.get('vocab_size')}, hash {str(archive_prov.get('vocab_hash'))[:12]}) "
            f"vs {lm.key} {prov['tokenizer_name']} (vocab {prov['vocab_size']}, hash "
            f"{prov['vocab_hash'][:12]}); positions would not align "
            f"(allow_tokenizer_mismatch=true scores the same token ids anyway)"
        )


def self_check(
    writer: archive.ArchiveWriter, lm: LoadedModel, prompt_ids, s0: int, n: int, window: float
) -> SelfCheck | None:
    """`engine.runtime.selfcheck` on the longest of the committed samples s0..s0+n-1 (this file's
    indices; `prompt_ids`: their prompt, or one per sample): recorded in the model group, and
    the run stops with one line beyond the bound (the file, still the `.partial`, is kept).
    None when every sample of the batch is empty (nothing to compare)."""
    samples = writer.f[F.SAMPLES]
    length = samples["length"][s0 : s0 + n]
    i = int(np.argmax(length))
    if length[i] == 0:
        return None
    ids = row_prompt(prompt_groups(prompt_ids, n), i)
    c = run_check(lm, writer.rows.g, s0 + i, ids, samples["tokens"][s0 + i], int(length[i]), window)
    writer.rows.record_self_check(c.sample, c.steps, c.max_abs_diff, c.bound)
    log.info(
        "self-check of %s on sample %d (%d steps): max |d log p| %.3g nats, bound %.3g, %.2f s",
        lm.key,
        c.sample,
        c.steps,
        c.max_abs_diff,
        c.bound,
        c.seconds,
    )
    enforce(c, lm.key, Path(writer.f.filename))
    return c


@dataclass
class FirstBatchCheck:
    """The run's self-check, once per process: after the first committed batch that has a
    step to compare (every archive-writing loop calls `after` for each committed batch)."""

    writer: archive.ArchiveWriter
    lm: LoadedModel
    window: float
    result: SelfCheck | None = None

    @property
    def pending(self) -> bool:
        return self.result is None

    def after(self, prompt_ids, s0: int, n: int) -> None:
        """Committed samples s0..s0+n-1 (this file's indices) of one prompt, or of one prompt
        per sample."""
        if self.pending:
            self.result = self_check(self.writer, self.lm, prompt_ids, s0, n, self.window)


def batches_key(key: dict, n_prompts: int, per_prompt: int, run: RunSettings) -> dict:
    """The run key of a sampling run, with `batches: across prompts` where a batch reads
    several prompts (absent otherwise: such runs keep the keys, and the bits, of one-prompt
    batches)."""
    if straddles(n_prompts, per_prompt, int(run.batch_size), run.across):
        key["batches"] = "across prompts"
    return key


def sample_all(
    writer: archive.ArchiveWriter,
    lm: LoadedModel,
    prompt_ids,
    per_prompt: int,
    sampling: Sampling,
    run: RunSettings,
    capture=(),
    seed_of=None,
    lens: Lens | None = None,
) -> SelfCheck | None:
    """Generate every remaining sample (from writer.n_complete on) and finish the archive.
    Seeds follow the global sample index (`seed_of(index)` overrides them: perturb shares
    seeds across variants), so a shard's samples are those of the unsharded run.
    Rows are written on a background thread while the next steps compute (`engine.runtime.overlap`;
    write_thread=false writes inline).  The first batch is self-checked once committed
    (`FirstBatchCheck`); returns that check.  `lens`: each step's lens statistics too, its
    invariant checked per batch (`engine.runtime.lens`)."""
    seed_of = seed_of or (lambda i: sample_seed(sampling.seed, i))
    span = writer.span(len(prompt_ids) * per_prompt)
    check = FirstBatchCheck(writer, lm, run.codec.window)

    def write(p, s0, s1):
        seeds = [seed_of(i) for i in range(s0, s1)]
        row_prompts = [prompt_ids[i // per_prompt] for i in range(s0, s1)]
        hooks = list(capture) + [h for h in (lens.hooks if lens else []) if h not in capture]
        steps = generate(
            lm.bridge,
            row_prompts,
            seeds,
            sampling.max_new_tokens,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            lm.eos_ids,
            hooks,
            sampling.on_nonfinite,
        )
        if lens is not None:
            steps = with_lens(lens, steps, capture)
        consume = lambda rows: writer.write_batch(s0 - span[0], seeds, rows, lm.eos_ids)
        try:
            pipe.batch(consume, (to_host(st, run.codec.codec, run.codec.window) for st in steps))
        except NonFiniteLogits as exc:
            raise EngineError(
                f"non-finite logits (NaN, +inf or no finite entry) from model "
                f"{lm.key} at sample {s0 + exc.rows[0]}, step {exc.step}; "
                f"on_nonfinite=record ends such samples there and keeps the "
                f"rest"
            ) from None
        if check.pending:  # wait for the batch's commit, then check it
            pipe.drain()
            check.after(row_prompts, s0 - span[0], s1 - s0)

    with overlapped(run.write_thread) as pipe:
        fill(
            len(prompt_ids),
            per_prompt,
            run.batch_size,
            writer.n_complete,
            f"sample {lm.key}",
            write,
            span,
            run.progress,
            run.device,
            run.across,
        )
    if lens is not None:
        writer.rows.record_lens_check(lens.worst, lens.bound)
    writer.finish()
    return check.result


def with_lens(lens: Lens, steps, capture=()):
    """Steps with their lens statistics, keeping only the activations asked to be stored."""
    keep = set(capture)
    for st in lens.over(steps):
        st.acts = {k: v for k, v in st.acts.items() if k in keep}
        yield st
