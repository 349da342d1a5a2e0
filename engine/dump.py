"""`python -m engine dump`: sample completions and stream every step's full logits to HDF5.

Thin Hydra wrapper (`main`) around `run(cfg) -> dict`, which tests call directly.
Output rules: the archive is written to `<out>.partial` and renamed when complete; an existing
`out` is replaced only with overwrite=true (and only once the new one is complete); a leftover
partial is continued with resume=true.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine import archive, codecs
from engine.cli import user_errors
from engine.config import CONF
from engine.errors import EngineError
from engine.models import load_model
from engine.prompts import check_chat_template, load_prompts, render, uses_chat_template
from engine.provenance import model_info, root_provenance
from engine.sampling import check_hooks, generate, sample_seed

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    if not (isinstance(cfg.n_samples, int) and cfg.n_samples > 0):
        raise EngineError(f"n_samples must be a positive integer, got {cfg.n_samples}")
    if not (isinstance(cfg.max_new_tokens, int) and cfg.max_new_tokens >= 0):
        raise EngineError(f"max_new_tokens must be an integer >= 0, got {cfg.max_new_tokens}")
    if not cfg.temperature > 0:
        raise EngineError(f"temperature must be > 0, got {cfg.temperature}")
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise EngineError(f"batch_size must be a positive integer, got {cfg.batch_size}")
    if not (isinstance(cfg.top_k, int) and cfg.top_k >= 0):
        raise EngineError(f"top_k must be an integer >= 0 (0 = off), got {cfg.top_k}")
    if not 0 < cfg.top_p <= 1:
        raise EngineError(f"top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    codecs.check_codec(cfg.codec, cfg.q16_window)


def plan_output(out: Path, partial: Path, resume: bool, overwrite: bool) -> bool:
    """Decide what to do with existing files; True means continue `partial`."""
    if out.is_dir():
        raise EngineError(f"out={out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise EngineError(f"{out} exists; pass overwrite=true to replace it")
    if partial.exists():
        if resume:
            return True
        if overwrite:
            return False
        raise EngineError(f"{partial} is left from an interrupted run: pass resume=true to "
                          f"continue it or overwrite=true to start over")
    return False


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


def run_key(cfg: DictConfig, prompts: list[str]) -> dict:
    """Settings that decide the archive's content; a resumed run must match them exactly."""
    keys = ("n_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size",
            "chat_template", "codec", "q16_window", "capture")
    out = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k]
           for k in keys}
    out["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    out["prompts"] = prompts
    return out


def capture_dims(lm, prompt_ids, capture) -> dict[str, int]:
    """Width of each captured hook, from a one-step probe; only [batch, pos, d] hooks fit."""
    if not capture:
        return {}
    check_hooks(lm.bridge, capture)
    steps = generate(lm.bridge, prompt_ids, [0], 1, capture=capture)
    first = next(steps)
    steps.close()
    dims = {}
    for name, a in first.acts.items():
        if a.dim() != 2:
            raise EngineError(f"hook {name} gives {tuple(a.shape)} per row; only hooks shaped "
                              f"[batch, pos, d] can be captured per step")
        dims[name] = int(a.shape[-1])
    return dims


def open_or_create(partial: Path, resuming: bool, key: dict, cfg, prompts, info,
                   dims=lambda: {}) -> archive.ArchiveWriter:
    """Reopen the partial archive of an interrupted run, or create a fresh one."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    if resuming:
        return archive.open_for_resume(partial, key)
    partial.unlink(missing_ok=True)
    return archive.create(partial, run_key=key, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                          provenance_root=root_provenance(), prompts=prompts,
                          n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, model=info,
                          codec=cfg.codec, window=cfg.q16_window, capture_dims=dims())


def sample_all(writer, lm, prompt_ids, per_prompt: int, cfg, capture=(), seed_of=None) -> None:
    """Generate every remaining sample (from writer.n_complete on) and finish the archive.
    `seed_of(index)` overrides the per-sample seed (perturb shares seeds across variants)."""
    total = len(prompt_ids) * per_prompt
    seed_of = seed_of or (lambda i: sample_seed(cfg.seed, i))
    bar = tqdm(total=total, initial=writer.n_complete, unit="sample", desc=f"sample {lm.key}",
               disable=not cfg.progress, dynamic_ncols=True)
    for p, s0, s1 in batches(len(prompt_ids), per_prompt, cfg.batch_size, writer.n_complete):
        seeds = [seed_of(i) for i in range(s0, s1)]
        steps = generate(lm.bridge, prompt_ids[p], seeds, cfg.max_new_tokens, cfg.temperature,
                         cfg.top_k, cfg.top_p, lm.eos_ids, list(capture))
        writer.write_batch(s0, seeds, steps, lm.eos_ids)
        bar.update(s1 - s0)
    bar.close()
    writer.finish()


def run(cfg: DictConfig) -> dict:
    validate(cfg)
    check_chat_template(cfg.chat_template)
    prompts = load_prompts(cfg.prompts)
    out = Path(str(cfg.out)).expanduser().resolve()
    partial = out.with_name(out.name + ".partial")
    resuming = plan_output(out, partial, cfg.resume, cfg.overwrite)
    lm = load_model(cfg.model, cfg.device, cfg.paths.cache_dir)
    chat = uses_chat_template(lm.tokenizer, cfg.chat_template)  # `auto` resolved once
    seen = [render(lm.tokenizer, p, chat) for p in prompts]
    capture = list(cfg.capture)
    info = model_info(lm, [t for t, _ in seen], [i for _, i in seen], chat_template=chat)
    writer = open_or_create(partial, resuming, run_key(cfg, prompts), cfg, prompts, info,
                            lambda: capture_dims(lm, seen[0][1], capture))
    with writer:
        done = writer.n_complete
        if resuming:
            log.info("resuming %s at sample %d of %d", partial, done, len(prompts) * cfg.n_samples)
        sample_all(writer, lm, [ids for _, ids in seen], cfg.n_samples, cfg, capture)
    total = len(prompts) * cfg.n_samples
    os.replace(partial, out)  # atomic: `out` is either the old file or the complete new one
    size = out.stat().st_size
    log.info("wrote %s (%d samples, %.1f MiB)", out, total, size / 2**20)
    return {"archive": str(out), "model": lm.key, "samples": total, "prompts": len(prompts),
            "max_new_tokens": cfg.max_new_tokens, "vocab": lm.vocab_size, "codec": cfg.codec,
            "bytes": size, "resumed_from": done if resuming else None}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="dump")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"archive: {result['archive']}")
