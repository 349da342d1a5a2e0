"""`python -m engine perturb source=ARCHIVE`: the attractor experiment, generalised.

For each parent completion in the source archive: cut it (after the first occurrence of a
string, or at a token count), then build two prefixes, prompt + kept completion:
  control  the kept tokens exactly as sampled;
  edit     prompt + kept text with an edit applied (replace / insert / delete), re-tokenized,
           or, for a fork, the kept tokens up to step t followed by the rank-r alternative to
           the token sampled there (ranked by the source's stored logits; forking paths).
Each prefix becomes one prompt of a new archive and gets `n_samples` continuations with full
per-step logits; continuation j of a variant and of its control share one seed (common random
numbers), so their differences come from the prefix.  /lineage records, per prompt: parent
sample, variant (control/edit/fork), cut, the edit, and the index of the matched control.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from engine import archive
from engine.cli import user_errors
from engine.commands.common import config_yaml, run_key
from engine.config import CONF
from engine.errors import EngineError
from engine.runtime import lens as lenses
from engine.runtime import output
from engine.runtime import run as R
from engine.runtime.models import LoadedModel
from engine.runtime.sampling import sample_seed
from engine.runtime.settings import ModelSpec, Output, RunSettings, Sampling, Shape, model_for

log = logging.getLogger(__name__)
KEYS = (
    "source",
    "parents",
    "cut_after",
    "cut_at",
    "edit",
    "fork",
    "n_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "batch_size",
    "codec",
    "q16_window",
)


def cut_position(tokenizer, tokens, after: str | None, at: int | None) -> int:
    """Number of completion tokens kept: the shortest prefix whose text contains `after`
    (its first occurrence), or `at`."""
    if after is None:
        if at is None or not 0 <= int(at) <= len(tokens):
            raise EngineError(f"cut_at must be in [0, {len(tokens)}] (or set cut_after)")
        return int(at)
    for c in range(1, len(tokens) + 1):
        if after in tokenizer.decode(tokens[:c]):
            return c
    raise EngineError(f"cut_after={after!r} does not occur in the parent completion")


def apply_edit(text: str, edit, deleted: int) -> tuple[str, str]:
    """(edited text, description); `text` is the prompt as the model read it followed by the
    kept completion (minus `deleted` tokens), so "Grace Hopper was" itself can be edited."""
    done = [f"delete {deleted} tokens"] if deleted else []
    if edit.replace is not None:
        old, new = list(edit.replace)
        if old not in text:
            raise EngineError(f"edit.replace: {old!r} does not occur in {text!r}")
        text = text.replace(old, new, 1)
        done.append(f"replace {old!r} -> {new!r}")
    if edit.insert:
        text += str(edit.insert)
        done.append(f"insert {str(edit.insert)!r}")
    if not done:
        raise EngineError("no edit: set edit.replace, edit.insert or edit.delete, or fork")
    return text, "; ".join(done)


def choose_parents(src: archive.Archive, tok, cfg) -> list[int]:
    """`parents` as given, or for parents=first the first completion of prompt 0 in which
    `cut_after` occurs (so "clip after the first sentence" always has a sentence to clip)."""
    if cfg.parents != "first":
        return [int(p) for p in cfg.parents]
    s = src.samples()
    for i in np.flatnonzero(s["prompt_index"] == 0):
        if cfg.cut_after is None or cfg.cut_after in tok.decode(
            s["tokens"][i, : int(s["length"][i])]
        ):
            return [int(i)]
    raise EngineError(f"no completion of prompt 0 contains cut_after={cfg.cut_after!r}")


def variants(src: archive.Archive, lm, cfg) -> list[dict]:
    """Control and perturbed prefix (full token ids: prompt + kept completion) per parent."""
    s, m = src.samples(), src.model()
    tok = lm.tokenizer
    out = []
    for parent in choose_parents(src, tok, cfg):
        if not 0 <= int(parent) < src.n_complete:
            raise EngineError(f"parent sample {parent} out of range (0..{src.n_complete - 1})")
        parent = int(parent)
        prompt_ids = m.prompt_tokens(int(s["prompt_index"][parent]))
        comp = [int(i) for i in s["tokens"][parent, : int(s["length"][parent])]]
        if cfg.fork is not None:
            t, r = int(cfg.fork.step), int(cfg.fork.rank)
            if not (0 <= t < len(comp) and r >= 1):
                raise EngineError(f"fork.step must be in [0, {len(comp)}) and fork.rank >= 1")
            row = m.rows(parent, t)
            order = [int(i) for i in np.argsort(-row, kind="stable") if int(i) != comp[t]]
            alt = order[r - 1]
            kept, pert_full = comp[: t + 1], prompt_ids + comp[:t] + [alt]
            kind, cut = "fork", t
            desc = f"fork at step {t}: {tok.decode([comp[t]])!r} -> rank-{r} alternative {tok.decode([alt])!r}"
        else:
            cut = cut_position(tok, comp, cfg.cut_after, cfg.cut_at)
            deleted = min(int(cfg.edit.delete), cut)
            kept = comp[:cut]
            text, desc = apply_edit(
                tok.decode(prompt_ids + kept[: cut - deleted]), cfg.edit, deleted
            )
            # the edited text is re-tokenized whole (special-token strings map back to ids)
            pert_full = tok(text, add_special_tokens=False)["input_ids"]
            kind = "edit"
        for variant, ids, d in (
            ("control", prompt_ids + kept, "unperturbed prefix"),
            (kind, pert_full, desc),
        ):
            ids = [int(i) for i in ids]
            out.append(
                {
                    "parent": parent,
                    "variant": variant,
                    "cut": cut,
                    "edit": d,
                    "prompt_ids": ids,
                    "text": tok.decode(ids),
                }
            )
    return out


def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    sampling, spec = Sampling.from_cfg(cfg), ModelSpec.from_node(cfg.model)
    rs = R.resolve_batch_size(RunSettings.from_cfg(cfg))
    if cfg.parents != "first" and not len(cfg.parents):
        raise EngineError("parents is empty: name source samples, or parents=first")
    lens_settings = lenses.LensSettings.from_cfg(cfg)
    key = run_key(cfg, KEYS, device=R.device_type(rs.device), batch_size=rs.batch_size)
    R.batches_key(key, 2, sampling.n_samples, rs)  # two variants (edited, control) at least
    if lens_settings.enabled:
        key["lens"] = lens_settings.key()
    plan = output.plan_output(Output.from_cfg(cfg), key)
    with archive.Archive(cfg.source) as src:
        gen = src.model()
        if model is None and spec.group != gen.key and not output.overridden("model"):
            raise EngineError(
                f"{cfg.source} was sampled by {gen.key}; perturb continues "
                f"with the same model: pass {model_for(gen.key, gen.provenance)}"
            )
        lm = R.load(spec, rs, model)
        lens = lenses.make(lm, lens_settings)
        R.check_tokenizer(src.model().provenance, lm)
        vs = variants(src, lm, cfg)
        source = {"created": src.created, "generator": src.generator}
    texts = [v["text"] for v in vs]
    rendered = R.Rendered(chat_template=False, text=texts, ids=[v["prompt_ids"] for v in vs])
    M = sampling.n_samples
    shape = Shape(M, sampling.max_new_tokens, config_yaml(cfg, batch_size=rs.batch_size))

    def create(partial):
        info = R.model_info(lm, rendered)
        return R.create_archive(partial, key, shape, texts, info, rs.codec, lens=lens)

    def lineage(w):
        w.write_lineage(vs, Path(str(cfg.source)).resolve(), source)

    def seed_of(i: int) -> int:  # continuation j of a pair shares its seed with the control's
        pair, j = i // (2 * M), i % M
        return sample_seed(sampling.seed, pair * M + j)

    with output.new_archive(plan, "perturb", create, key, lineage) as writer:
        R.sample_all(writer, lm, rendered.ids, M, sampling, rs, seed_of=seed_of, lens=lens)
    log.info("wrote %s: %d variants x %d continuations", plan.out, len(vs), M)
    return {
        "archive": str(plan.out),
        "samples": len(vs) * M,
        "variants": [{k: v[k] for k in ("parent", "variant", "cut", "edit")} for v in vs],
    }


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="perturb")
def main(cfg: DictConfig) -> None:
    with user_errors():
        result = run(cfg)
    for v in result["variants"]:
        print(f"parent {v['parent']} {v['variant']:<7} cut {v['cut']:>3}: {v['edit']}")
    print(f"archive: {result['archive']}")
