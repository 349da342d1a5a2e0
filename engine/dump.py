"""`python -m engine dump`: sample completions and stream every step's full logits to HDF5.

Thin Hydra wrapper (`main`) around `run(cfg, model=None) -> dict`, which tests call directly;
the shared steps (output planning, prompts, the batch loop, the final rename) are
`engine.run`'s.
"""

from __future__ import annotations

import dataclasses
import logging

import hydra
from omegaconf import DictConfig

from engine import run as R
from engine.cli import user_errors
from engine.config import CONF
from engine.errors import EngineError
from engine.models import LoadedModel
from engine.prompts import check_chat_template, load_prompts
from engine.sampling import check_hooks, generate

log = logging.getLogger(__name__)
KEYS = ("n_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size",
        "chat_template", "codec", "q16_window", "capture")


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


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    R.validate_sampling(cfg)
    check_chat_template(cfg.chat_template)
    prompts = load_prompts(cfg.prompts)
    shard = R.plan_shard(cfg, len(prompts))
    R.shard_device(cfg, shard)
    key = R.run_key(cfg, KEYS, prompts=prompts, device=R.device_type(cfg))
    if shard is not None:  # the shard's own key; `merge` drops it again
        key["shard"] = [shard.index, shard.count]
    o = R.plan_output(cfg, key)
    lm = R.load(cfg, model)
    seen = R.read_prompts(lm, prompts, cfg.chat_template)
    # one hook point may be given bare: capture=blocks.0.hook_resid_post
    capture = [str(cfg.capture)] if isinstance(cfg.capture, str) else [str(c) for c in cfg.capture]
    writer = R.open_or_create(o, key, cfg, prompts,
                              R.model_info(lm, seen),
                              lambda: capture_dims(lm, seen.ids[0], capture), shard=shard)
    lo, hi = writer.span(len(prompts) * cfg.n_samples)
    with writer:
        done = writer.n_complete
        if o.resuming:
            log.info("resuming %s at sample %d of %d", o.partial, done, hi - lo)
        check = R.sample_all(writer, lm, seen.ids, cfg.n_samples, cfg, capture)
    size = R.finalize(o)
    where = "" if shard is None else f", shard {shard.index} of {shard.count}: samples {lo}..{hi - 1}"
    log.info("wrote %s (%d samples%s, %.1f MiB)", o.out, hi - lo, where, size / 2**20)
    return {"archive": str(o.out), "model": lm.key, "samples": hi - lo, "prompts": len(prompts),
            "max_new_tokens": cfg.max_new_tokens, "vocab": lm.vocab_size, "codec": cfg.codec,
            "bytes": size, "resumed_from": done if o.resuming else None,
            "self_check": None if check is None else dataclasses.asdict(check),
            "shard": None if shard is None else [shard.index, shard.count, lo, hi]}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="dump")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"archive: {result['archive']}")
