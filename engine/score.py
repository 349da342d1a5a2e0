"""`python -m engine score archive=PATH model=NAME`: pair every stored step with a second
model's distribution on the identical context.

The scoring model reads each prompt its own way (raw text or its chat template; by default as
the archive's dump was told: true/false/auto; what it read is stored in its group) followed
by exactly the completion token ids in the archive, in one teacher-forced forward per batch;
its logits at the positions that predicted each stored token go into /models/<key>, row for
row with the generator's.
Tokenizers must agree (same vocabulary hash and logit width) unless allow_tokenizer_mismatch.

Writes go into the archive in place: the group is created at full size with every chunk
allocated, rows are written into it, and the group's own `n_complete` is rewritten after each
batch, so a killed run resumes with resume=true and the generator's data is never touched.
"""

from __future__ import annotations

import json
import logging

import h5py
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from engine import archive, codecs
from engine.cli import user_errors
from engine.dump import batches
from engine.config import CONF
from engine.errors import EngineError
from engine.models import load_model
from engine.prompts import check_chat_template, render, uses_chat_template
from engine.provenance import model_info
from engine.reader import Archive
from engine.sampling import Step, forward_logits

log = logging.getLogger(__name__)


def score_key(cfg: DictConfig) -> dict:
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "chat_template": cfg.chat_template, "codec": cfg.codec,
            "allow_tokenizer_mismatch": cfg.allow_tokenizer_mismatch}


def plan_group(f: h5py.File, key: str, generator: str, cfg: DictConfig) -> bool:
    """True: continue an existing partial group; False: create it (deleting a replaced one)."""
    if key == generator:
        raise EngineError(f"model {key!r} is the archive's generator; score it under another "
                          f"group name (model.key=...)")
    g = f.get(f"models/{key}")
    if g is None:
        return False
    if bool(g.attrs.get("complete", 0)) and not cfg.overwrite:
        raise EngineError(f"the archive already has model {key!r}; pass overwrite=true to "
                          f"replace it")
    if cfg.overwrite:
        del f[f"models/{key}"]
        return False
    if not cfg.resume:
        raise EngineError(f"model {key!r} was partly scored ({int(g.attrs['n_complete'])} "
                          f"samples): pass resume=true to continue or overwrite=true to restart")
    if json.loads(g.attrs.get("score_key", "{}")) != json.loads(json.dumps(score_key(cfg))):
        raise EngineError(f"cannot resume scoring {key!r}: it was started with different "
                          f"settings; use overwrite=true")
    return True


def check_tokenizers(gen: dict, prov: dict, allow: bool) -> None:
    same = gen.get("vocab_hash") == prov["vocab_hash"] and \
        int(gen.get("vocab_size", -1)) == int(prov["vocab_size"])
    if not same and not allow:
        raise EngineError(
            f"tokenizer mismatch: archive {gen.get('tokenizer_name')} (vocab {gen.get('vocab_size')}, "
            f"hash {str(gen.get('vocab_hash'))[:12]}) vs {prov['tokenizer_name']} (vocab "
            f"{prov['vocab_size']}, hash {prov['vocab_hash'][:12]}); positions would not align "
            f"(allow_tokenizer_mismatch=true scores the same token ids anyway)")


def teacher_forced_steps(bridge, prompt_ids, tokens: np.ndarray, length: np.ndarray, device):
    """Steps [t] of a batch from one forward over prompt + completion: row t is the
    distribution at the position that predicted stored token t."""
    n, P = len(tokens), len(prompt_ids)
    L = int(length.max(initial=0))
    if L == 0:
        return
    comp = np.where(tokens[:, :L] >= 0, tokens[:, :L], 0)  # right padding never reaches
    ids = torch.tensor(np.concatenate([np.tile(prompt_ids, (n, 1)), comp], 1),  # earlier rows
                       dtype=torch.long, device=device)  # [batch, pos]
    logits = forward_logits(bridge, ids)  # [batch, pos, vocab]
    lengths = torch.as_tensor(length, device=device)
    for t in range(L):
        yield Step(t, logits[:, P - 1 + t], {}, torch.as_tensor(comp[:, t], device=device),
                   t < lengths)


def run(cfg: DictConfig) -> dict:
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise EngineError(f"batch_size must be a positive integer, got {cfg.batch_size}")
    with Archive(cfg.archive) as a:  # validates: exists, HDF5, schema, version, complete
        path, generator = a.path, a.generator
        gen_prov = a.model().provenance
        codec = cfg.codec or a.model().codec
        prompts, samples = a.prompts, a.samples()
        chat = cfg.chat_template
        if chat is None:  # read the prompts the way the generator was told to (true/false/auto)
            chat = a.run_key.get("chat_template", False)
        per_prompt, T = int(a.f.attrs["samples_per_prompt"]), a.max_new_tokens
    codecs.check_codec(codec, cfg.q16_window)
    check_chat_template(chat)
    lm = load_model(cfg.model, cfg.device, cfg.paths.cache_dir)
    check_tokenizers(gen_prov, lm.provenance, cfg.allow_tokenizer_mismatch)
    chat = uses_chat_template(lm.tokenizer, chat)  # `auto` resolved once
    seen = [render(lm.tokenizer, p, chat) for p in prompts]
    total = len(samples["length"])
    with h5py.File(path, "r+") as f:
        resuming = plan_group(f, lm.key, generator, cfg)
        if not resuming:
            info = model_info(lm, [t for t, _ in seen], [i for _, i in seen], role="scored",
                              chat_template=chat,
                              score_key=json.dumps(score_key(cfg), sort_keys=True))
            archive.add_model_group(f, info, total, T, codec, cfg.q16_window)
            f.flush()
        w = archive.ModelWriter(f[f"models/{lm.key}"])
        done = w.n_complete
        bar = tqdm(total=total, initial=done, unit="sample", desc=f"score {lm.key}",
                   disable=not cfg.progress, dynamic_ncols=True)
        for p, s0, s1 in batches(len(prompts), per_prompt, cfg.batch_size, done):
            steps = teacher_forced_steps(lm.bridge, seen[p][1], samples["tokens"][s0:s1],
                                         samples["length"][s0:s1], lm.device)
            _, length = w.write(s0, s1 - s0, steps)
            if not np.array_equal(length, samples["length"][s0:s1]):
                raise RuntimeError("scored rows do not match the stored lengths")  # a bug
            w.commit(s1)
            bar.update(s1 - s0)
        bar.close()
        w.finish()
    log.info("scored %s into %s (%d samples)", lm.key, path, total)
    return {"archive": str(path), "model": lm.key, "samples": total, "codec": codec,
            "resumed_from": done if resuming else None}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="score")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"scored {result['model']} into {result['archive']}")
