"""`python -m engine layers archive=PATH model@base=NAME model@aligned=NAME`: two models'
logit lenses on identical tokens, compared layer by layer.

Both models are teacher-forced together over the archive's prompts and completions (one
forward each per batch, as `score` does), every chosen block's residual stream is read through
each model's own final norm and unembedding (`engine.runtime.lens`, its invariant checked on
both), and per [sample, step, layer pair] the kernels store KL(base_l || aligned_l), its
reverse, JS and the per-row power gamma_l = argmin KL(aligned_l || base_l^gamma)
(`kernels.lens.layer_pair_stats`) into /layer_pairs/<base>~<aligned> of the archive, in place
(resume=true continues a killed run).  Nothing of the rows is kept: memory is one batch of each
model's forward plus one step's [layers, rows, vocab] lens logits per model.

Pairing: models of the same depth pair block l with block l; models of different depths pair
by relative depth, each chosen block l of the aligned model with the base block
round((l + 1) * depth_base / depth_aligned) - 1, halves rounded up (the group's `pairing` attribute says which).
"""

from __future__ import annotations

import logging
import math

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import archive
from engine.archive import format as F
from engine.archive import layer_pairs
from engine.cli import user_errors
from engine.config import CONF
from engine.errors import EngineError
from engine.runtime import lens as lenses
from engine.runtime import output
from engine.runtime import run as R
from engine.runtime.models import LoadedModel
from engine.runtime.prompts import check_chat_template
from engine.runtime.sampling import input_device
from engine.runtime.schedule import fill
from engine.runtime.settings import ModelSpec, RunSettings
from engine.runtime.teacher import teacher_forced_steps
from kernels.lens import layer_pair_stats

log = logging.getLogger(__name__)


def pair_layers(settings: lenses.LensSettings, depth_base: int, depth_aligned: int):
    """(base blocks, aligned blocks, pairing): the aligned model's chosen blocks and the base
    block each is compared with."""
    aligned = settings.resolve(depth_aligned)
    if depth_base == depth_aligned:
        return aligned, aligned, "layer"
    base = tuple(
        min(depth_base - 1, max(0, math.floor((la + 1) * depth_base / depth_aligned + 0.5) - 1))
        for la in aligned
    )
    return base, aligned, "relative depth"


def run(cfg: DictConfig, models: tuple[LoadedModel, LoadedModel] | None = None) -> dict:
    specs = ModelSpec.from_node(cfg.base), ModelSpec.from_node(cfg.aligned)
    # the lens's layer rule and its checks, read from the one key this verb has
    only = OmegaConf.create({"lens": True, "lens_layers": cfg.lens_layers, "lens_topk": 1})
    settings = lenses.LensSettings.from_cfg(only)
    if specs[0].group == specs[1].group:
        raise EngineError(f"base and aligned are the same model ({specs[0].group})")
    with archive.Archive(cfg.archive) as a:
        path, gen_prov = a.path, a.model().provenance
        prompts, samples = a.prompts, a.samples()
        chat = cfg.chat_template
        if chat is None:
            chat = a.run_key.get("chat_template", False)
        per_prompt, span = a.samples_per_prompt, a.span
    check_chat_template(chat)
    rs = R.resolve_batch_size(RunSettings.from_cfg(cfg))
    lms = models or tuple(R.load(s, rs) for s in specs)
    for lm in lms:
        R.check_tokenizer(gen_prov, lm, cfg.allow_tokenizer_mismatch)
    base, aligned = lms
    depths = lenses.depth(base.bridge), lenses.depth(aligned.bridge)
    lb, la, pairing = pair_layers(settings, *depths)
    lens_b = lenses.Lens(base, tuple(sorted(set(lb))), 1)
    lens_a = lenses.Lens(aligned, la, 1)
    idx_b = [lens_b.layers.index(i) for i in lb]
    seen = [R.read_prompts(lm, prompts, chat) for lm in lms]
    key = {
        "base": OmegaConf.to_container(cfg.base, resolve=True),
        "aligned": OmegaConf.to_container(cfg.aligned, resolve=True),
        "lens_layers": settings.key()["layers"],
        "chat_template": chat,
    }
    w, resuming = layer_pairs.open_group(
        path,
        base=base.key,
        aligned=aligned.key,
        layers_base=lb,
        layers_aligned=la,
        depth_base=depths[0],
        depth_aligned=depths[1],
        pairing=pairing,
        key=key,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
    )
    name = layer_pairs.group_name(base.key, aligned.key)
    T, P = samples["tokens"].shape[1], len(la)
    with output.writing(
        f"layer pairs {name} of {path}", output.continue_command("layers", "resume=true"), w
    ):
        done = w.n_complete

        def write(p, g0, g1):
            s0, s1 = g0 - span[0], g1 - span[0]
            tokens, length = samples["tokens"][s0:s1], samples["length"][s0:s1]
            steps = [
                teacher_forced_steps(
                    lm.bridge, sn.ids[p], tokens, length, input_device(lm.bridge), lens.hooks
                )
                for lm, sn, lens in zip(lms, seen, (lens_b, lens_a))
            ]
            out = {k: np.zeros((s1 - s0, T, P), np.float32) for k in F.LAYER_PAIR_STATS}
            with torch.inference_mode():
                for sb, sa in zip(*steps):
                    for js in lens_a.chunks(*sa.logits.shape):  # pairs, memory-bounded
                        xb = lens_b.logits(sb, [idx_b[j] for j in js])  # [pair, rows, vocab]
                        xa = lens_a.logits(sa, js)
                        for k, v in zip(F.LAYER_PAIR_STATS, layer_pair_stats(xb, xa)):
                            out[k][:, sb.t, js[0] : js[-1] + 1] = v.cpu().numpy()
            lens_b.check()
            lens_a.check()
            w.write(s0, out, length)
            w.commit(s1)

        fill(
            len(prompts),
            per_prompt,
            rs.batch_size,
            done,
            f"layers {name}",
            write,
            span,
            rs.progress,
            rs.device,
        )
        w.finish()
    log.info(
        "lens check: %s %.3g (bound %.3g), %s %.3g (bound %.3g)",
        base.key,
        lens_b.worst,
        lens_b.bound,
        aligned.key,
        lens_a.worst,
        lens_a.bound,
    )
    log.info("wrote layer pairs %s into %s (%d pairs, %s)", name, path, P, pairing)
    return {
        "archive": str(path),
        "group": name,
        "layers_base": list(lb),
        "layers_aligned": list(la),
        "pairing": pairing,
        "resumed_from": done if resuming else None,
        "lens_check": {
            base.key: [lens_b.worst, lens_b.bound],
            aligned.key: [lens_a.worst, lens_a.bound],
        },
    }


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="layers")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    print(f"layer pairs {result['group']} ({result['pairing']}) in {result['archive']}")
