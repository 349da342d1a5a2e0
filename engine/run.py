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

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm

from engine import archive
from engine.archive import codecs
from engine.archive import format as F
from engine.errors import EngineError, on_interrupt
from engine.models import LoadedModel, load_model, resolve_device
from engine.prompts import render, uses_chat_template
from engine.overlap import Overlap, to_host
from engine.provenance import root_provenance, tokenizer_record
from engine.sampling import NonFiniteLogits, generate, sample_seed
from engine.selfcheck import SelfCheck, enforce, run_check

log = logging.getLogger(__name__)


# ---- settings --------------------------------------------------------------------------------
#: batch_size=auto by device: CPU throughput is flat past ~8 rows; on a GPU 32 rows keep a
#: 7B model's forward compute-bound while [32, vocab] float32 rows stay ~20 MB per step
AUTO_BATCH = {"cpu": 8, "cuda": 32}


def check_batch_size(cfg: DictConfig) -> None:
    """batch_size: a positive integer, or auto (resolved here, by device, into cfg)."""
    if cfg.batch_size == "auto":
        with open_dict(cfg):
            cfg.batch_size = AUTO_BATCH.get(resolve_device(cfg.device).type, 8)
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size > 0):
        raise EngineError(f"batch_size must be a positive integer or auto, got {cfg.batch_size}")


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


def device_type(cfg: DictConfig) -> str:
    """cpu or cuda: part of a sampled archive's run key, since logits (not the draws: see
    `engine.sampling`) differ in their last bits between devices."""
    return resolve_device(cfg.device).type


def shard_device(cfg: DictConfig, shard: archive.Shard | None) -> None:
    """device=auto or cuda (no index) in a sharded dump that sees several GPUs (one machine,
    no scheduler isolating them) takes GPU shard % count; under SLURM each job sees one GPU.
    An explicit cuda:N is left alone."""
    if shard is not None and cfg.device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        with open_dict(cfg):
            cfg.device = f"cuda:{shard.index % torch.cuda.device_count()}"


# ---- output planning ---------------------------------------------------------------------------
@dataclass
class Output:
    out: Path  # the final archive
    partial: Path  # where it is written until complete
    resuming: bool  # continue `partial`


def plan_output(cfg: DictConfig, key: dict | None = None) -> Output:
    """Decide what to do with existing files from cfg.out, cfg.resume, cfg.overwrite.

    resume=PATH continues that `.partial` (or the partial of that archive).  resume=true
    continues `<out>.partial`; when `out` is the default (inside this run's fresh Hydra
    directory) and holds none, the newest partial with the same run key in an earlier run's
    directory (outputs/<verb>/<time>/) is continued: an interrupted run resumes without
    copying its path."""
    resume = cfg.resume
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        out = Path(resume.removesuffix(".partial")).expanduser().resolve()
        if not out.with_name(out.name + ".partial").exists():
            raise EngineError(f"resume={resume}: no {out.name}.partial there to continue")
        return Output(out, out.with_name(out.name + ".partial"), True)
    resume = resume is True or str(resume).lower() == "true"
    out = Path(str(cfg.out)).expanduser().resolve()
    partial = out.with_name(out.name + ".partial")
    if out.is_dir():
        raise EngineError(f"out={out} is a directory; give a file path")
    if out.exists() and not cfg.overwrite:
        raise EngineError(f"{out} exists; pass overwrite=true to replace it")
    if resume and not partial.exists() and key is not None and _default_out(cfg, out):
        found = find_partial(out, key)
        if found is None:
            raise EngineError("resume=true: no interrupted run with these settings beside "
                              "this one (resume=PATH continues a given .partial)")
        return Output(found.with_name(found.name.removesuffix(".partial")), found, True)
    resuming = False
    if partial.exists():
        if resume:
            resuming = True
        elif not cfg.overwrite:
            raise EngineError(f"{partial} is left from an interrupted run: pass resume=true to "
                              f"continue it or overwrite=true to start over")
    return Output(out, partial, resuming)


def _default_out(cfg: DictConfig, out: Path) -> bool:
    try:
        return out.parent == Path(str(cfg.paths.output_dir)).expanduser().resolve()
    except Exception:  # no Hydra run directory (plain compose): nothing to search
        return False


def _earlier_runs(out: Path) -> list[Path]:
    """Where earlier runs of this verb left `<out.name>.partial`: every run directory beside
    this run's (outputs/<verb>/*/) and every job directory of every multirun beside this
    multirun's (outputs/<verb>-multirun/*/*/), wherever hydra.run.dir / hydra.sweep.dir
    point; without Hydra, the siblings of out's directory."""
    name = f"{out.name}.partial"
    roots = [(out.parent.parent, f"*/{name}")]
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        roots = [(Path(str(hc.run.dir)).resolve().parent, f"*/{name}"),
                 (Path(str(hc.sweep.dir)).resolve().parent, f"*/*/{name}")]
    except ValueError:  # not under @hydra.main (tests calling run())
        pass
    return sorted({p.resolve() for root, pat in roots for p in root.glob(pat)})


def find_partial(out: Path, key: dict) -> Path | None:
    """Newest partial left by an earlier run (see `_earlier_runs`) whose run key is `key` (a
    shard's key holds its index, so each shard finds its own)."""
    want = json.loads(json.dumps(key))
    found = sorted(_earlier_runs(out), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        try:
            with archive.Archive(path, allow_partial=True) as a:
                if a.run_key == want:
                    return path
        except EngineError:
            continue
    return None


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main (tests calling run())
        return sys.argv[1:]


def overridden(group: str) -> bool:
    """Whether the command line chose `group=...` (rather than the config's default)."""
    return any(a.lstrip("+~").split("=", 1)[0] == group for a in _task_overrides())


def continue_command(verb: str, *extra: str) -> str:
    """The command that continues this run: its own overrides, `extra` instead of out/resume/
    overwrite."""
    args = [a for a in _task_overrides() if not a.startswith(("out=", "resume=", "overwrite="))]
    return " ".join(["python -m engine", verb, *map(shlex.quote, [*args, *extra])])


def open_or_create(o: Output, key: dict, cfg: DictConfig, prompts: list[str],
                   info: archive.ModelInfo, dims=lambda: {}, verb: str = "dump",
                   shard: archive.Shard | None = None) -> archive.ArchiveWriter:
    """Reopen the partial archive of an interrupted run, or create a fresh one (of `shard`'s
    samples only, when given); from here on an interrupt prints the command that continues
    it."""
    o.partial.parent.mkdir(parents=True, exist_ok=True)
    if o.resuming:
        w = archive.open_for_resume(o.partial, key)
        if w.rows.self_check_failed():
            w.close()
            raise EngineError(f"cannot resume {o.partial}: its self-check failed (its rows are "
                              f"not the model's distributions; inspect shows the check); use "
                              f"overwrite=true to start over")
    else:
        o.partial.unlink(missing_ok=True)
        w = _create(o, key, cfg, prompts, info, dims, shard)
    on_interrupt(f"{o.partial} keeps the finished batches; continue with: "
                 f"{continue_command(verb, f'resume={o.partial}')}")
    return w


def _create(o, key, cfg, prompts, info, dims, shard=None):
    return archive.create(o.partial, run_key=key, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                          provenance_root=root_provenance(), prompts=prompts,
                          n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, model=info,
                          codec=cfg.codec, window=cfg.q16_window, capture_dims=dims(),
                          shard=shard)


def finalize(o: Output) -> int:
    """Atomic rename: `out` is either the old file or the complete new one.  Returns bytes."""
    os.replace(o.partial, o.out)
    on_interrupt(None)
    return o.out.stat().st_size


# ---- models and prompts ------------------------------------------------------------------------
def load(cfg: DictConfig, model: LoadedModel | None = None) -> LoadedModel:
    """The configured model, or `model` when the caller already loaded one (tests, benches)."""
    if model is not None:
        return model
    deterministic = bool(cfg.get("deterministic", False))
    if deterministic:
        make_deterministic()
    return load_model(cfg.model, cfg.device, cfg.paths.cache_dir, cfg.get("device_map"),
                      deterministic)


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
def batches(n_prompts: int, per_prompt: int, batch_size: int, start: int,
            stop: int | None = None):
    """(prompt, first sample, end sample) of every batch covering samples start..stop-1
    (global indices); batches never straddle prompts, so every row of a batch reads the same
    prompt, and they lie on one grid (each prompt's first sample + k * batch_size) whatever
    start is: a shard or a resumed run decodes exactly the batches of one uninterrupted run."""
    stop = n_prompts * per_prompt if stop is None else stop
    for p in range(n_prompts):
        for s0 in range(p * per_prompt, (p + 1) * per_prompt, batch_size):
            s1 = min(s0 + batch_size, (p + 1) * per_prompt)
            if s1 > start and s0 < stop:
                yield p, max(s0, start), min(s1, stop)


def plan_shard(cfg: DictConfig, n_prompts: int) -> archive.Shard | None:
    """This process's share of a sharded dump (shard=i num_shards=n): a contiguous run of whole
    batches, batch b of B going to shard b * n // B, so the shards differ by at most one batch.
    None when the dump is not sharded (num_shards=1)."""
    index, count = cfg.get("shard", 0), cfg.get("num_shards", 1)
    if not (isinstance(count, int) and count >= 1):
        raise EngineError(f"num_shards must be a positive integer, got {count}")
    if not (isinstance(index, int) and 0 <= index < count):
        raise EngineError(f"shard must be an integer in 0..{count - 1} (num_shards={count}), "
                          f"got {index}")
    if count == 1:
        return None
    n_batches = len(list(batches(n_prompts, cfg.n_samples, cfg.batch_size, 0)))
    if count > n_batches:
        raise EngineError(f"num_shards={count} is more than the run's {n_batches} batches "
                          f"({n_prompts} prompts x {cfg.n_samples} samples, batch_size="
                          f"{cfg.batch_size}); use num_shards <= {n_batches}")
    return shard_of(n_prompts, cfg.n_samples, cfg.batch_size, index, count)


def shard_of(n_prompts: int, per_prompt: int, batch_size: int, index: int,
             count: int) -> archive.Shard:
    """Shard `index` of `count`: batches b * count // B == index of the run's B batches."""
    grid = list(batches(n_prompts, per_prompt, batch_size, 0))
    lo, hi = index * len(grid) // count, (index + 1) * len(grid) // count
    return archive.Shard(index, count, grid[lo][1], grid[hi - 1][2], n_prompts * per_prompt)


def out_of_memory(rows: int, device) -> str:
    """One line for a batch that does not fit, naming a batch size that would."""
    free = ""
    if torch.cuda.is_available():
        f, total = torch.cuda.mem_get_info()
        free = f" ({f / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    return (f"a batch of {rows} rows does not fit in GPU memory{free} on device={device}; "
            f"use batch_size={max(1, rows // 2)} (with overwrite=true: the batch size is part "
            f"of the run key)")


def fill(n_prompts: int, per_prompt: int, cfg: DictConfig, done: int, desc: str,
         write: Callable[[int, int, int], None], span: tuple[int, int] | None = None) -> None:
    """Call write(prompt, s0, s1) (global sample indices) for every batch of the archive's
    samples `span` (default: all) after its first `done`; each call writes and commits one
    batch.  A progress bar counts samples."""
    lo, hi = span or (0, n_prompts * per_prompt)
    with tqdm(total=hi - lo, initial=done, unit="sample", desc=desc,
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        for p, s0, s1 in batches(n_prompts, per_prompt, cfg.batch_size, lo + done, hi):
            try:
                write(p, s0, s1)
            except torch.cuda.OutOfMemoryError:
                raise EngineError(out_of_memory(s1 - s0, cfg.device)) from None
            bar.update(s1 - s0)


def self_check(writer: archive.ArchiveWriter, lm: LoadedModel, prompt_ids, s0: int, n: int,
               window: float) -> SelfCheck | None:
    """`engine.selfcheck` on the longest of the committed samples s0..s0+n-1 (this file's
    indices): recorded in the model group, and the run stops with one line beyond the bound
    (the file, still the `.partial`, is kept).  None when every sample of the batch is empty
    (nothing to compare)."""
    samples = writer.f[F.SAMPLES]
    length = samples["length"][s0:s0 + n]
    i = int(np.argmax(length))
    if length[i] == 0:
        return None
    c = run_check(lm, writer.rows.g, s0 + i, prompt_ids, samples["tokens"][s0 + i],
                  int(length[i]), window)
    writer.rows.record_self_check(c.sample, c.steps, c.max_abs_diff, c.bound)
    log.info("self-check of %s on sample %d (%d steps): max |d log p| %.3g nats, bound %.3g, "
             "%.2f s", lm.key, c.sample, c.steps, c.max_abs_diff, c.bound, c.seconds)
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
        """Committed samples s0..s0+n-1 (this file's indices) of one prompt."""
        if self.pending:
            self.result = self_check(self.writer, self.lm, prompt_ids, s0, n, self.window)


def sample_all(writer: archive.ArchiveWriter, lm: LoadedModel, prompt_ids, per_prompt: int,
               cfg: DictConfig, capture=(), seed_of=None) -> SelfCheck | None:
    """Generate every remaining sample (from writer.n_complete on) and finish the archive.
    Seeds follow the global sample index (`seed_of(index)` overrides them: perturb shares
    seeds across variants), so a shard's samples are those of the unsharded run.
    Rows are written on a background thread while the next steps compute (`engine.overlap`;
    write_thread=false writes inline).  The first batch is self-checked once committed
    (`FirstBatchCheck`); returns that check."""
    seed_of = seed_of or (lambda i: sample_seed(cfg.seed, i))
    pipe = Overlap(threaded=bool(cfg.get("write_thread", True)))
    span = writer.span(len(prompt_ids) * per_prompt)
    check = FirstBatchCheck(writer, lm, cfg.q16_window)

    def write(p, s0, s1):
        seeds = [seed_of(i) for i in range(s0, s1)]
        steps = generate(lm.bridge, prompt_ids[p], seeds, cfg.max_new_tokens, cfg.temperature,
                         cfg.top_k, cfg.top_p, lm.eos_ids, list(capture),
                         cfg.get("on_nonfinite", "fail"))
        consume = (lambda rows: writer.write_batch(s0 - span[0], seeds, rows, lm.eos_ids))
        try:
            pipe.batch(consume, (to_host(st, cfg.codec, cfg.q16_window) for st in steps))
        except NonFiniteLogits as exc:
            raise EngineError(f"non-finite logits (NaN, +inf or no finite entry) from model "
                              f"{lm.key} at sample {s0 + exc.rows[0]}, step {exc.step}; "
                              f"on_nonfinite=record ends such samples there and keeps the "
                              f"rest") from None
        if check.pending:  # wait for the batch's commit, then check it
            pipe.drain()
            check.after(prompt_ids[p], s0 - span[0], s1 - s0)

    try:
        fill(len(prompt_ids), per_prompt, cfg, writer.n_complete, f"sample {lm.key}", write,
             span)
    except BaseException:
        pipe.close(abort=True)  # complete batches are still committed; the one in flight is not
        raise
    pipe.close()
    writer.finish()
    return check.result
