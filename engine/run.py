"""The one orchestration shared by the verbs that write archives (dump, score, perturb).

Each verb is: validate settings -> plan the output (`.partial`, resume, overwrite) -> load the
model (or take one already loaded) -> render prompts the model's way -> open or create the
archive -> fill it batch by batch with a progress bar, committing after each batch -> rename
atomically.  Everything here is that sequence's shared parts; the verbs keep only what makes
them different (where rows come from, what the run key holds).

Output rules: the archive is written to `<out>.partial` and renamed when complete; an existing
`out` is replaced only with overwrite=true (and only once the new one is complete); a leftover
partial is continued with resume=true.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine import archive
from engine.archive import codecs
from engine.encode import encode_rows
from engine.errors import EngineError
from engine.models import LoadedModel, load_model
from engine.prompts import render, uses_chat_template
from engine.provenance import root_provenance, tokenizer_record
from engine.sampling import Step, generate, sample_seed


# ---- settings --------------------------------------------------------------------------------
def check_batch_size(cfg: DictConfig) -> None:
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise EngineError(f"batch_size must be a positive integer, got {cfg.batch_size}")


def validate_sampling(cfg: DictConfig) -> None:
    """The sampling keys shared by dump and perturb (conf/sampling/default.yaml)."""
    if not (isinstance(cfg.n_samples, int) and cfg.n_samples > 0):
        raise EngineError(f"n_samples must be a positive integer, got {cfg.n_samples}")
    if not (isinstance(cfg.max_new_tokens, int) and cfg.max_new_tokens >= 0):
        raise EngineError(f"max_new_tokens must be an integer >= 0, got {cfg.max_new_tokens}")
    if not cfg.temperature > 0:
        raise EngineError(f"temperature must be > 0, got {cfg.temperature}")
    check_batch_size(cfg)
    if not (isinstance(cfg.top_k, int) and cfg.top_k >= 0):
        raise EngineError(f"top_k must be an integer >= 0 (0 = off), got {cfg.top_k}")
    if not 0 < cfg.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    codecs.check_codec(cfg.codec, cfg.q16_window)


def run_key(cfg: DictConfig, keys: Iterable[str], **extra) -> dict:
    """Settings that decide an archive's content (the model always among them); a resumed run
    must match them exactly."""
    out = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
           for k in keys}
    out["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    return {**out, **extra}


# ---- output planning ---------------------------------------------------------------------------
@dataclass
class Output:
    out: Path  # the final archive
    partial: Path  # where it is written until complete
    resuming: bool  # continue `partial`


def plan_output(cfg: DictConfig) -> Output:
    """Decide what to do with existing files from cfg.out, cfg.resume, cfg.overwrite."""
    out = Path(str(cfg.out)).expanduser().resolve()
    partial = out.with_name(out.name + ".partial")
    if out.is_dir():
        raise EngineError(f"out={out} is a directory; give a file path")
    if out.exists() and not cfg.overwrite:
        raise EngineError(f"{out} exists; pass overwrite=true to replace it")
    resuming = False
    if partial.exists():
        if cfg.resume:
            resuming = True
        elif not cfg.overwrite:
            raise EngineError(f"{partial} is left from an interrupted run: pass resume=true to "
                              f"continue it or overwrite=true to start over")
    return Output(out, partial, resuming)


def open_or_create(o: Output, key: dict, cfg: DictConfig, prompts: list[str],
                   info: archive.ModelInfo, dims=lambda: {}) -> archive.ArchiveWriter:
    """Reopen the partial archive of an interrupted run, or create a fresh one."""
    o.partial.parent.mkdir(parents=True, exist_ok=True)
    if o.resuming:
        return archive.open_for_resume(o.partial, key)
    o.partial.unlink(missing_ok=True)
    return archive.create(o.partial, run_key=key, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                          provenance_root=root_provenance(), prompts=prompts,
                          n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, model=info,
                          codec=cfg.codec, window=cfg.q16_window, capture_dims=dims())


def finalize(o: Output) -> int:
    """Atomic rename: `out` is either the old file or the complete new one.  Returns bytes."""
    os.replace(o.partial, o.out)
    return o.out.stat().st_size


# ---- models and prompts ------------------------------------------------------------------------
def load(cfg: DictConfig, model: LoadedModel | None = None) -> LoadedModel:
    """The configured model, or `model` when the caller already loaded one (tests, benches)."""
    return model if model is not None else load_model(cfg.model, cfg.device, cfg.paths.cache_dir)


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
    return archive.ModelInfo(key=lm.key, provenance=dict(lm.provenance),
                             vocab_size=lm.vocab_size, prompt_text=r.text, prompt_tokens=r.ids,
                             vocab_strings=strings, tokenizer_json=tok_json,
                             chat_template=r.chat_template, **kw)


def check_tokenizer(archive_prov: dict, lm: LoadedModel, allow: bool = False) -> None:
    """The one compatibility rule: same vocabulary hash and logit width, or `allow`."""
    prov = lm.provenance
    same = archive_prov.get("vocab_hash") == prov["vocab_hash"] and \
        int(archive_prov.get("vocab_size", -1)) == int(prov["vocab_size"])
    if not same and not allow:
        raise EngineError(
            f"tokenizer mismatch: archive {archive_prov.get('tokenizer_name')} (vocab "
            f"{archive_prov.get('vocab_size')}, hash {str(archive_prov.get('vocab_hash'))[:12]}) "
            f"vs {lm.key} {prov['tokenizer_name']} (vocab {prov['vocab_size']}, hash "
            f"{prov['vocab_hash'][:12]}); positions would not align "
            f"(allow_tokenizer_mismatch=true scores the same token ids anyway)")


# ---- the batch loop ----------------------------------------------------------------------------
def batches(n_prompts: int, per_prompt: int, batch_size: int, start: int):
    """(prompt, first sample, end sample) for every batch from sample `start` on; batches never
    straddle prompts, so every row of a batch reads the same prompt."""
    for p in range(n_prompts):
        for s0 in range(p * per_prompt, (p + 1) * per_prompt, batch_size):
            s1 = min(s0 + batch_size, (p + 1) * per_prompt)
            if s1 > start:
                if s0 < start:  # only possible if batch_size changed, which run_key forbids
                    raise EngineError("resume point is not on a batch boundary")
                yield p, s0, s1


def fill(n_prompts: int, per_prompt: int, cfg: DictConfig, start: int, desc: str,
         write: Callable[[int, int, int], None]) -> None:
    """Call write(prompt, s0, s1) for every remaining batch (each call writes and commits one
    batch), with a progress bar over samples."""
    with tqdm(total=n_prompts * per_prompt, initial=start, unit="sample", desc=desc,
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        for p, s0, s1 in batches(n_prompts, per_prompt, cfg.batch_size, start):
            write(p, s0, s1)
            bar.update(s1 - s0)


def encoded(steps: Iterable[Step], codec: str, window: float) -> Iterator[archive.Rows]:
    """Torch steps -> the writer's host-side `Rows` (encoded on the device, then copied)."""
    for st in steps:
        data, scale, offset = encode_rows(codec, st.logits, window)
        yield archive.Rows(t=st.t, data=data, tokens=st.tokens.cpu().numpy(),
                           alive=st.alive.cpu().numpy(), scale=scale, offset=offset,
                           acts={k: a.float().cpu().numpy() for k, a in st.acts.items()})


def sample_all(writer: archive.ArchiveWriter, lm: LoadedModel, prompt_ids, per_prompt: int,
               cfg: DictConfig, capture=(), seed_of=None) -> None:
    """Generate every remaining sample (from writer.n_complete on) and finish the archive.
    `seed_of(index)` overrides the per-sample seed (perturb shares seeds across variants)."""
    seed_of = seed_of or (lambda i: sample_seed(cfg.seed, i))

    def write(p, s0, s1):
        seeds = [seed_of(i) for i in range(s0, s1)]
        steps = generate(lm.bridge, prompt_ids[p], seeds, cfg.max_new_tokens, cfg.temperature,
                         cfg.top_k, cfg.top_p, lm.eos_ids, list(capture))
        writer.write_batch(s0, seeds, encoded(steps, cfg.codec, cfg.q16_window), lm.eos_ids)

    fill(len(prompt_ids), per_prompt, cfg, writer.n_complete, f"sample {lm.key}", write)
    writer.finish()
