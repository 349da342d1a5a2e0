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
row with the generator's.  Tokenizers must agree (`engine.runtime.run.check_tokenizer`).

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
from omegaconf import DictConfig, OmegaConf

from engine import archive
from engine.archive import format as F
from engine.cli import user_errors
from engine.config import CONF
from engine.errors import EngineError
from engine.runtime import lens as lenses
from engine.runtime import output
from engine.runtime import run as R
from engine.runtime.models import LoadedModel
from engine.runtime.overlap import overlapped, to_host
from engine.runtime.prompts import check_chat_template
from engine.runtime.sampling import NonFiniteLogits, input_device
from engine.runtime.schedule import fill
from engine.runtime.settings import ModelSpec, RunSettings, model_for
from engine.runtime.teacher import teacher_forced_steps

log = logging.getLogger(__name__)


def score_key(cfg: DictConfig, lens: lenses.LensSettings | None = None) -> dict:
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "chat_template": cfg.chat_template,
        "codec": cfg.codec,
        "allow_tokenizer_mismatch": cfg.allow_tokenizer_mismatch,
    }
    if cfg.counterpart:
        key["counterpart"] = True
    if lens is not None and lens.enabled:  # absent otherwise: older groups' keys still match
        key["lens"] = lens.key()
    return key


def counterpart_prompts(a: archive.Archive, key: str) -> R.Rendered:
    """counterpart=true: each prompt of a perturbation archive is read as its lineage partner
    (control <-> variant: prompt p reads prompt p XOR 1), token for token as the generator
    read it, so every continuation is teacher-forced after the other prefix of its pair."""
    if a.lineage() is None:
        raise EngineError(
            "counterpart=true needs an archive from `python -m engine perturb` "
            "(this one has no /lineage)"
        )
    gen = a.model()
    if key != gen.key:
        raise EngineError(
            f"counterpart=true teacher-forces the generator itself: pass "
            f"{model_for(gen.key, gen.provenance)}"
        )
    n = len(a.prompts)
    return R.Rendered(
        False,
        [gen.prompt_text[p ^ 1] for p in range(n)],
        [gen.prompt_tokens(p ^ 1) for p in range(n)],
    )


def check_key(a: archive.Archive, key: str, cfg: DictConfig) -> None:
    """Refusals that need no model: the generator's own key, a complete group without
    overwrite (checked again, with resume rules, when the group is opened for writing)."""
    if key == a.generator:
        raise EngineError(
            f"model {key!r} is the archive's generator; score it under another "
            f"group name (model.key=...)"
        )
    if key in a.models and a.models[key].complete and not cfg.overwrite:
        raise EngineError(
            f"the archive already has model {key!r}; pass overwrite=true to replace it"
        )


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    spec = ModelSpec.from_node(cfg.model)
    lens_settings = lenses.LensSettings.from_cfg(cfg)
    with archive.Archive(cfg.archive) as a:  # validates: exists, HDF5, schema, version, complete
        group = spec.group
        partner = counterpart_prompts(a, group) if cfg.counterpart else None
        if partner is not None:
            group += F.COUNTERPART_SUFFIX
        check_key(a, group, cfg)
        path, gen = a.path, a.model()
        gen_prov = gen.provenance
        prompts, samples = a.prompts, a.samples()
        chat = cfg.chat_template
        if chat is None:  # read the prompts the way the generator was told to (true/false/auto)
            chat = a.run_key.get("chat_template", False)
        per_prompt, span = a.samples_per_prompt, a.span  # a shard: its share of the samples
    # the run settings, checked once the codec is known (codec=null: the generator's)
    rs = R.resolve_batch_size(RunSettings.from_cfg(cfg, codec=cfg.codec or gen.codec))
    codec = rs.codec
    check_chat_template(chat)
    lm = R.load(spec, rs, model)
    lens = lenses.make(lm, lens_settings)
    R.check_tokenizer(gen_prov, lm, cfg.allow_tokenizer_mismatch)
    top = int(samples["tokens"].max(initial=-1))
    if top >= lm.vocab_size:  # only possible with allow_tokenizer_mismatch: refuse, write nothing
        raise EngineError(
            f"the archive's completions use token id {top}, outside {lm.key}'s "
            f"vocabulary of {lm.vocab_size}: it cannot score them"
        )
    if partner is not None:
        lm = dataclasses.replace(lm, key=group)
    seen = partner or R.read_prompts(lm, prompts, chat)
    info = R.model_info(
        lm,
        seen,
        role="scored",
        score_key=json.dumps(score_key(cfg, lens_settings), sort_keys=True),
    )
    total = len(samples["length"])
    w, resuming = archive.open_scored_group(
        path,
        info,
        codec=codec.codec,
        window=codec.window,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        lens=None if lens is None else lens.layout(),
    )
    with output.writing(
        f"group {lm.key} of {path}", output.continue_command("score", "resume=true"), w
    ):
        done = w.n_complete

        def write(p, g0, g1):  # global sample indices -> this file's
            s0, s1 = g0 - span[0], g1 - span[0]
            steps = teacher_forced_steps(
                lm.bridge,
                seen.ids[p],
                samples["tokens"][s0:s1],
                samples["length"][s0:s1],
                input_device(lm.bridge),
                capture=lens.hooks if lens else (),
            )
            if lens is not None:
                steps = R.with_lens(lens, steps)

            def consume(rows):  # on the writer thread: the batch's rows, then its commit
                _, length, _ = w.write(s0, s1 - s0, rows)
                if not np.array_equal(length, samples["length"][s0:s1]):
                    raise RuntimeError("scored rows do not match the stored lengths")  # a bug
                w.commit(s1)

            try:
                pipe.batch(consume, (to_host(st, codec.codec, codec.window) for st in steps))
            except NonFiniteLogits as exc:
                raise EngineError(
                    f"non-finite logits (NaN, +inf or no finite entry) from "
                    f"model {lm.key} at sample {s0 + exc.rows[0]}, step "
                    f"{exc.step}; nothing of this batch was committed"
                ) from None

        with overlapped(rs.write_thread) as pipe:
            fill(
                len(prompts),
                per_prompt,
                rs.batch_size,
                done,
                f"score {lm.key}",
                write,
                span,
                rs.progress,
                rs.device,
            )
        if lens is not None:
            w.record_lens_check(lens.worst, lens.bound)
        w.finish()
    log.info("scored %s into %s (%d samples)", lm.key, path, total)
    return {
        "archive": str(path),
        "model": lm.key,
        "samples": total,
        "codec": codec.codec,
        "resumed_from": done if resuming else None,
    }


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="score")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"scored {result['model']} into {result['archive']}")
