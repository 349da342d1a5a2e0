"""`python -m engine dump`: sample completions and stream every step's full logits to HDF5.

Thin Hydra wrapper (`main`) around `run(cfg, model=None) -> dict`, which tests call directly.
`run` turns the config into typed settings once; the shared steps are the runtime's: output
planning and the write lifecycle (`engine.runtime.output`), the batch schedule
(`engine.runtime.schedule`), loading, prompts and the sampling loop (`engine.runtime.run`).
"""

from __future__ import annotations

import dataclasses
import logging

import hydra
from omegaconf import DictConfig

from engine.cli import user_errors
from engine.commands.common import config_yaml, run_key
from engine.config import CONF
from engine.errors import EngineError
from engine.runtime import lens as lenses
from engine.runtime import output
from engine.runtime import run as R
from engine.runtime.models import LoadedModel
from engine.runtime.prompts import check_chat_template, load_prompts
from engine.runtime.sampling import check_hooks, generate
from engine.runtime.schedule import plan_shard
from engine.runtime.settings import ModelSpec, Output, RunSettings, Sampling, Shape, Sharding

log = logging.getLogger(__name__)
KEYS = (
    "n_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "batch_size",
    "chat_template",
    "codec",
    "q16_window",
    "capture",
)


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
            raise EngineError(
                f"hook {name} gives {tuple(a.shape)} per row; only hooks shaped "
                f"[batch, pos, d] can be captured per step"
            )
        dims[name] = int(a.shape[-1])
    return dims


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    sampling, spec = Sampling.from_cfg(cfg), ModelSpec.from_node(cfg.model)
    rs = R.resolve_batch_size(RunSettings.from_cfg(cfg))
    check_chat_template(cfg.chat_template)
    lens_settings = lenses.LensSettings.from_cfg(cfg)
    prompts = load_prompts(cfg.prompts.texts, cfg.prompts.file, cfg.prompts.get("take"))
    shard = plan_shard(
        Sharding.from_cfg(cfg), len(prompts), sampling.n_samples, rs.batch_size, rs.across
    )
    rs = R.shard_device(rs, shard)
    key = run_key(
        cfg, KEYS, prompts=prompts, device=R.device_type(rs.device), batch_size=rs.batch_size
    )
    R.batches_key(key, len(prompts), sampling.n_samples, rs)
    if shard is not None:  # the shard's own key; `merge` drops it again
        key["shard"] = [shard.index, shard.count]
    if lens_settings.enabled:  # absent otherwise: keys of runs without a lens are unchanged
        key["lens"] = lens_settings.key()
    plan = output.plan_output(Output.from_cfg(cfg), key)
    lm = R.load(spec, rs, model)
    lens = lenses.make(lm, lens_settings)
    seen = R.read_prompts(lm, prompts, cfg.chat_template)
    # one hook point may be given bare: capture=blocks.0.hook_resid_post
    capture = [str(cfg.capture)] if isinstance(cfg.capture, str) else [str(c) for c in cfg.capture]
    shape = Shape(
        sampling.n_samples,
        sampling.max_new_tokens,
        config_yaml(cfg, batch_size=rs.batch_size, device=rs.device),
    )
    create = lambda partial: R.create_archive(
        partial,
        key,
        shape,
        prompts,
        R.model_info(lm, seen),
        rs.codec,
        capture_dims(lm, seen.ids[0], capture),
        shard,
        lens,
    )
    with output.new_archive(plan, "dump", create, key) as writer:
        lo, hi = writer.span(len(prompts) * sampling.n_samples)
        done = writer.n_complete
        if plan.resuming:
            log.info("resuming %s at sample %d of %d", plan.partial, done, hi - lo)
        check = R.sample_all(
            writer, lm, seen.ids, sampling.n_samples, sampling, rs, capture, lens=lens
        )
    size = plan.out.stat().st_size
    where = (
        "" if shard is None else f", shard {shard.index} of {shard.count}: samples {lo}..{hi - 1}"
    )
    log.info("wrote %s (%d samples%s, %.1f MiB)", plan.out, hi - lo, where, size / 2**20)
    return {
        "archive": str(plan.out),
        "model": lm.key,
        "samples": hi - lo,
        "prompts": len(prompts),
        "max_new_tokens": sampling.max_new_tokens,
        "vocab": lm.vocab_size,
        "codec": rs.codec.codec,
        "bytes": size,
        "resumed_from": done if plan.resuming else None,
        "self_check": None if check is None else dataclasses.asdict(check),
        "shard": None if shard is None else [shard.index, shard.count, lo, hi],
        "lens": None if lens is None else {"layers": list(lens.layers), "k": lens.k},
    }


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="dump")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"archive: {result['archive']}")
