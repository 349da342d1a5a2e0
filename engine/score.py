"""`python -m engine score archive=PATH model=NAME`: pair every stored step with a second
model's distribution on the identical context.

`counterpart=true` on a perturbation archive instead teacher-forces the generator over every
continuation after the *other* prefix of its (control, variant) pair, into the group
`<generator>@counterpart`: the edit's influence on identical continuation tokens
(`analysis=attractor`).

The scoring model reads each prompt its own way (raw text or its chat template; by default as
the archive's dump was told: true/false/auto; what it read is stored in its group) followed
by exactly the completion token ids in the archive, in one teacher-forced forward per batch;
its logits at the positions that predicted each stored token go into /models/<key>, row for
row with the generator's.  Tokenizers must agree (`engine.run.check_tokenizer`).

Writes go into the archive in place: the group is created at full size with every chunk
allocated, rows are written into it, and the group's own `n_complete` is rewritten after each
batch, so a killed run resumes with resume=true and the generator's data is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import archive
from engine import run as R
from engine.archive import codecs
from engine.cli import user_errors
from engine.archive import format as F
from engine.config import CONF, model_for, model_key
from engine.errors import EngineError, on_interrupt
from engine.models import LoadedModel
from engine.prompts import check_chat_template
from engine.overlap import encoded
from engine.sampling import NonFiniteLogits, Step, forward_logits, input_device

log = logging.getLogger(__name__)


def score_key(cfg: DictConfig) -> dict:
    key = {"model": OmegaConf.to_container(cfg.model, resolve=True),
           "chat_template": cfg.chat_template, "codec": cfg.codec,
           "allow_tokenizer_mismatch": cfg.allow_tokenizer_mismatch}
    if cfg.get("counterpart"):
        key["counterpart"] = True
    return key


def counterpart_prompts(a: archive.Archive, key: str) -> R.Rendered:
    """counterpart=true: each prompt of a perturbation archive is read as its lineage partner
    (control <-> variant: prompt p reads prompt p XOR 1), token for token as the generator
    read it, so every continuation is teacher-forced after the other prefix of its pair."""
    if a.lineage() is None:
        raise EngineError("counterpart=true needs an archive from `python -m engine perturb` "
                          "(this one has no /lineage)")
    gen = a.model()
    if key != gen.key:
        raise EngineError(f"counterpart=true teacher-forces the generator itself: pass "
                          f"{model_for(gen.key, gen.provenance)}")
    n = len(a.prompts)
    return R.Rendered(False, [gen.prompt_text[p ^ 1] for p in range(n)],
                      [gen.prompt_tokens(p ^ 1) for p in range(n)])


def teacher_forced_steps(bridge, prompt_ids, tokens: np.ndarray, length: np.ndarray, device):
    """Steps [t] of a batch from one forward over prompt + completion: row t is the
    distribution at the position that predicted stored token t.  Full-vocabulary logits are
    computed only there (the last L + 1 positions), not over the prompt."""
    n = len(tokens)
    L = int(length.max(initial=0))
    if L == 0:
        return
    comp = np.where(tokens[:, :L] >= 0, tokens[:, :L], 0)  # right padding never reaches
    ids = torch.tensor(np.concatenate([np.tile(prompt_ids, (n, 1)), comp], 1),  # earlier rows
                       dtype=torch.long, device=device)  # [batch, pos]
    logits = forward_logits(bridge, ids, keep=L + 1)  # [batch, L + 1, vocab] from pos P - 1
    finite = torch.isfinite(logits.amax(dim=-1)).cpu().numpy()  # [batch, L + 1]: one sync
    for t in range(L):
        alive = t < length
        bad = alive & ~finite[:, t]
        if bad.any():
            raise NonFiniteLogits(np.flatnonzero(bad).tolist(), t)
        yield Step(t, logits[:, t], {}, comp[:, t].astype(np.int64), alive)


def check_key(a: archive.Archive, key: str, cfg: DictConfig) -> None:
    """Refusals that need no model: the generator's own key, a complete group without
    overwrite (checked again, with resume rules, when the group is opened for writing)."""
    if key == a.generator:
        raise EngineError(f"model {key!r} is the archive's generator; score it under another "
                          f"group name (model.key=...)")
    if key in a.models and a.models[key].complete and not cfg.overwrite:
        raise EngineError(f"the archive already has model {key!r}; pass overwrite=true to "
                          f"replace it")


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    R.check_batch_size(cfg)
    with archive.Archive(cfg.archive) as a:  # validates: exists, HDF5, schema, version, complete
        group = model_key(cfg.model)
        partner = counterpart_prompts(a, group) if cfg.get("counterpart") else None
        if partner is not None:
            group += F.COUNTERPART_SUFFIX
        check_key(a, group, cfg)
        path, gen = a.path, a.model()
        gen_prov, codec = gen.provenance, cfg.codec or gen.codec
        prompts, samples = a.prompts, a.samples()
        chat = cfg.chat_template
        if chat is None:  # read the prompts the way the generator was told to (true/false/auto)
            chat = a.run_key.get("chat_template", False)
        per_prompt, span = a.samples_per_prompt, a.span  # a shard: its share of the samples
    codecs.check_codec(codec, cfg.q16_window)
    check_chat_template(chat)
    lm = R.load(cfg, model)
    R.check_tokenizer(gen_prov, lm, cfg.allow_tokenizer_mismatch)
    top = int(samples["tokens"].max(initial=-1))
    if top >= lm.vocab_size:  # only possible with allow_tokenizer_mismatch: refuse, write nothing
        raise EngineError(f"the archive's completions use token id {top}, outside {lm.key}'s "
                          f"vocabulary of {lm.vocab_size}: it cannot score them")
    if partner is not None:
        lm = dataclasses.replace(lm, key=group)
    seen = partner or R.read_prompts(lm, prompts, chat)
    info = R.model_info(lm, seen, role="scored",
                        score_key=json.dumps(score_key(cfg), sort_keys=True))
    total = len(samples["length"])
    w, resuming = archive.open_scored_group(path, info, codec=codec, window=cfg.q16_window,
                                            resume=cfg.resume, overwrite=cfg.overwrite)
    on_interrupt(f"group {lm.key} of {path} keeps the finished batches; continue with: "
                 f"{R.continue_command('score', 'resume=true')}")
    with w:
        done = w.n_complete

        def write(p, g0, g1):  # global sample indices -> this file's
            s0, s1 = g0 - span[0], g1 - span[0]
            steps = teacher_forced_steps(lm.bridge, seen.ids[p], samples["tokens"][s0:s1],
                                         samples["length"][s0:s1], input_device(lm.bridge))
            try:
                _, length, _ = w.write(s0, s1 - s0, encoded(steps, codec, cfg.q16_window))
            except NonFiniteLogits as exc:
                raise EngineError(f"non-finite logits (NaN, +inf or no finite entry) from "
                                  f"model {lm.key} at sample {s0 + exc.rows[0]}, step "
                                  f"{exc.step}; nothing of this batch was committed") from None
            if not np.array_equal(length, samples["length"][s0:s1]):
                raise RuntimeError("scored rows do not match the stored lengths")  # a bug
            w.commit(s1)

        R.fill(len(prompts), per_prompt, cfg, done, f"score {lm.key}", write, span)
        w.finish()
    on_interrupt(None)
    log.info("scored %s into %s (%d samples)", lm.key, path, total)
    return {"archive": str(path), "model": lm.key, "samples": total, "codec": codec,
            "resumed_from": done if resuming else None}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="score")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"scored {result['model']} into {result['archive']}")
