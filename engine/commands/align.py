"""`python -m engine align`: a preference-trained twin of a reference model, made the way the
theory says alignment works, so that the engine can measure a real base/aligned pair offline.

Theory (Verbalized Sampling, Zhang et al. 2025): raters who score a response by
r(x, y) = r_true(x, y) + alpha * log pi_ref(y | x) and a KL-regularised optimum with strength
beta give pi* ∝ pi_ref**gamma * exp(r_true / beta) with gamma = 1 + alpha / beta, a
sequence-level power.  DPO (Rafailov et al. 2023) optimises that objective from preference
pairs.  So:

1. candidates: the engine's own `dump` samples K completions per training prompt with full
   logits (`<cache>/aligned/candidates/<id>.h5`, q16: log-probs to 1.8e-4 nats), kept and
   shared by builds that differ only in labels or training;
2. log pi_ref(y | x) of every completion from the stored logits (`K.token_stats` over the
   archive), not from a second forward;
3. pairs (0, 1), (2, 3), ... of each prompt's completions, both truncated to their common
   length (equal-length truncation: the log-likelihood sums run over the same number of
   tokens, so it does not just reward short answers); pairs shorter than `min_tokens` dropped;
4. labels: a Bradley-Terry draw, P(y_i > y_j) = sigmoid(r_i - r_j), r = alpha * log pi_ref(y|x)
   + noise * N(0, 1) (r_true), with the recorded `label_seed`; alpha = 0 is the coin-flip control;
5. DPO with TRL's `DPOTrainer` (sigmoid loss, strength beta, full fine-tune in float32), the
   reference log-probs precomputed: step 2's, checked against TRL's own forward on one batch;
   the LM head scores only the completions' positions (`compact_lm_head`);
6. a HuggingFace directory `<cache>/aligned/<name>-<build id>/` with provenance.json
   (`engine.runtime.builds`); the model configs `smollm2-135m-typical-dpo` and
   `smollm2-135m-random-dpo` load it.

Each step survives an interruption: the build directory is `.build-<name>-<id>` until the
final rename, and a rerun reuses the candidates archive (or resumes its partial dump).
`candidates_only=true` stops after step 1, so that builds sharing the candidates (the twin
and its control) can then train side by side (`make demo`: one torch thread each, `threads=1`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

import kernels as K
from engine.archive import Archive
from engine.cli import user_errors
from engine.commands import dump
from engine.commands.common import run_key
from engine.config import CONF
from engine.errors import EngineError
from engine.files import atomic_replace
from engine.runtime.builds import CHECKS, PROVENANCE, build_dir, read_build, record_latest
from engine.runtime.models import LoadedModel, load_hf_source
from engine.runtime.prompts import load_prompts
from engine.runtime.provenance import package_versions, sha256_file
from engine.runtime.sampling import library_versions
from engine.runtime.settings import ModelSpec, RunSettings, Sampling
from engine.stream import map_rows

log = logging.getLogger(__name__)
LN2 = float(np.log(2.0))
#: settings that decide the candidates (with the model and the prompts)
CANDIDATE_KEYS = (
    "n_samples",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "chat_template",
    "codec",
    "q16_window",
    "batch_size",  # the batches change the candidates' last bits (padding, matrix shapes)
    "batch_across_prompts",
)
#: settings that decide the weights: the build id hashes them
ID_KEYS = (*CANDIDATE_KEYS, "min_tokens", "alpha", "beta", "noise", "label_seed", "train")


def validate(cfg: DictConfig) -> None:
    Sampling.from_cfg(cfg), RunSettings.from_cfg(cfg)  # the sampling and run keys, checked
    if cfg.n_samples < 2 or cfg.n_samples % 2:
        raise EngineError(f"n_samples (K) must be an even number >= 2, got {cfg.n_samples}")
    if not cfg.beta > 0:
        raise EngineError(f"beta must be > 0, got {cfg.beta}")
    if not cfg.alpha >= 0 or not cfg.noise >= 0:
        raise EngineError(f"alpha and noise must be >= 0, got {cfg.alpha}, {cfg.noise}")
    if not (isinstance(cfg.min_tokens, int) and 1 <= cfg.min_tokens <= cfg.max_new_tokens):
        raise EngineError(f"min_tokens must be in [1, max_new_tokens], got {cfg.min_tokens}")
    if not (cfg.train.epochs > 0 and cfg.train.batch_pairs > 0 and cfg.train.learning_rate > 0):
        raise EngineError("train.epochs, train.batch_pairs and train.learning_rate must be > 0")
    threads = cfg.get("threads")
    if threads is not None and not (
        isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1
    ):
        raise EngineError(f"threads must be null or a positive integer, got {threads}")


def settings_id(cfg: DictConfig, prompts: list[str], keys) -> str:
    """sha256 of the run key (the reference model's config and the settings `keys`) and the
    prompts; a build also hashes the TRL version."""
    extra = {"trl": package_versions()["trl"]} if "train" in keys else {}
    spec = run_key(cfg, keys, prompts=prompts, **extra)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def candidates_path(cache: Path, cid: str) -> Path:
    path = cache / "aligned" / "candidates" / f"{cid[:16]}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---- steps 2-4: log-likelihoods, pairs, labels -------------------------------------------------
def completion_logprobs(a: Archive, progress: bool) -> np.ndarray:
    """log pi_ref of every stored token, [sample, step] (NaN past a sample's length)."""
    res, sample, step = map_rows(
        a, K.token_stats, with_tokens=True, progress=progress, desc="log pi_ref"
    )
    lp = np.full((a.n_samples, a.max_new_tokens), np.nan)
    lp[sample, step] = res["logprob"]
    return lp


def bradley_terry_labels(
    logp: np.ndarray,
    length: np.ndarray,
    k: int,
    min_tokens: int,
    alpha: float,
    noise: float,
    seed: int,
) -> list[dict]:
    """Pairs (0,1), (2,3), ... of each prompt's k completions (prompt-major samples), truncated
    to their common length L; r = alpha * sum_{t<L} log pi_ref + noise * N(0,1); the first of
    the pair wins when u < sigmoid(r_0 - r_1), u ~ U[0,1).  Draws come from one generator
    seeded with `seed`, in this order: the noise of every sample, then u of every pair."""
    rng = np.random.default_rng(seed)
    r_true = noise * rng.standard_normal(len(length))  # one per completion
    pairs = []
    for i in range(0, len(length) - 1, 2):
        if i // k != (i + 1) // k:  # pairs never straddle prompts (k is even)
            raise ValueError("pairs straddle prompts")
        j, L = i + 1, int(min(length[i], length[i + 1]))
        pairs.append({"prompt": i // k, "a": i, "b": j, "length": L})
    u = rng.random(len(pairs))
    out = []
    for pr, ui in zip(pairs, u):
        L = pr["length"]
        if L < min_tokens:
            continue
        la, lb = float(np.sum(logp[pr["a"], :L])), float(np.sum(logp[pr["b"], :L]))
        ra, rb = alpha * la + r_true[pr["a"]], alpha * lb + r_true[pr["b"]]
        p_a = float(np.exp(-np.logaddexp(0.0, -(ra - rb))))  # sigmoid(ra - rb), no overflow
        a_wins = bool(ui < p_a)
        out.append(
            {
                **pr,
                "logp_a": la,
                "logp_b": lb,
                "r_a": float(ra),
                "r_b": float(rb),
                "p_a": p_a,
                "u": float(ui),
                "chosen": pr["a"] if a_wins else pr["b"],
                "rejected": pr["b"] if a_wins else pr["a"],
            }
        )
    return out


# ---- step 5: DPO ---------------------------------------------------------------------------------
def unchecked(cand: Path) -> bool:
    """Whether a cached candidates archive carries no passed run self-check (it was sampled
    before the check existed, possibly without context)."""
    try:
        with Archive(cand) as a:
            c = a.model().self_check
    except EngineError:
        return True
    return c is None or not c["max_abs_diff"] <= c["bound"]


def check_reference(
    ref: np.ndarray, ours: np.ndarray, lengths: np.ndarray, token_bound: float
) -> tuple[float, float]:
    """TRL's reference log-probs of whole sequences `ref` against ours from the stored logits
    `ours` (same tokens): each may differ by at most its length times the per-token bound of
    the candidates' self-check.  Returns (max |diff|, largest bound); EngineError beyond."""
    diff, bounds = np.abs(ref - ours), lengths * token_bound
    worst = int(np.argmax(diff - bounds))
    if diff[worst] > bounds[worst]:
        raise EngineError(
            f"TRL's reference log-probs differ from the stored ones by "
            f"{diff[worst]:.3g} nats on a {int(lengths[worst])}-token sequence "
            f"(bound {bounds[worst]:.3g}): the candidates are not the reference "
            f"model's distributions ({library_versions()}); nothing was trained "
            f"or cached"
        )
    return float(diff.max()), float(bounds.max())


def first_loss_tolerance(beta: float, seq_bound: float) -> float:
    """|first DPO loss - ln 2| allowed: at step one the policy is the reference, so every
    pair's margin is 0 up to the reference log-probs' error: each of the four sequence
    log-probs is off by at most `seq_bound`, the margin by 2 beta seq_bound, and
    -log sigmoid moves by at most half of that."""
    return beta * seq_bound + 1e-6


def first_loss_callback(beta: float, seq_bound: float):
    """A TrainerCallback that stops training with one line at the first logged loss when it
    is not ln 2 within `first_loss_tolerance`."""
    from transformers import TrainerCallback

    tol = first_loss_tolerance(beta, seq_bound)

    class FirstLoss(TrainerCallback):
        checked = False  # set once the first loss was seen: train_dpo refuses a build without

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.global_step <= 1:
                self.checked = True
                loss = float(logs["loss"])
                if not abs(loss - LN2) <= tol:
                    raise EngineError(
                        f"the first DPO loss is {loss:.4f}, not ln 2 = {LN2:.4f} "
                        f"(tolerance {tol:.2g}): the policy does not start as "
                        f"its reference ({library_versions()}); nothing was "
                        f"cached"
                    )

    return FirstLoss()


@contextlib.contextmanager
def compact_lm_head(on: bool):
    """TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) scores only the positions
    that carry a label (the completions) where it runs Triton (CUDA, XPU), and every position
    elsewhere, because on Neuron a changing number of positions changes the tile shapes and
    recompiles.  Nothing recompiles on the CPU, where the prompts are about 3/4 of a pair's
    tokens: with `on`, TRL's choice answers "compact" on every device.  The log-probs are the
    same sums over the same positions (the prompt positions were masked to 0 after scoring);
    only the matrix shapes, and so the last bits, differ.  Measured on 2 cores: 5.2 s per DPO
    step of 8 pairs against about 9.5 s scoring every position."""
    if not on:
        yield
        return
    tu, choice = trl_position_choice()
    tu._use_triton = lambda *args, **kwargs: True
    try:
        yield
    finally:
        tu._use_triton = choice


def trl_position_choice():
    """(TRL's module, its function) that chooses the fused LM head's positions; one line
    naming the setting to turn off where this TRL has none (`run` asks before any work)."""
    import trl.trainer.utils as tu

    choice = getattr(tu, "_use_triton", None)
    if not callable(choice):
        raise EngineError(
            f"train.compact_lm_head=true: TRL {package_versions()['trl']} has no "
            f"trl.trainer.utils._use_triton (the fused LM head's choice of positions): "
            f"set train.compact_lm_head=false"
        )
    return tu, choice


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to `n` (None: as they are) for the block, and back after;
    yields the count in use.  Set here, after the numba kernels: their OpenMP launches reset
    it (a process started with OMP_NUM_THREADS=1 trained on 2)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")


def dpo_trainer(cfg: DictConfig, model, tok, examples: list[dict], workdir: Path):
    """TRL's DPOTrainer over pre-tokenized pairs (`COLUMNS`), set up as a build trains."""
    import torch
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; DPO needs a pad id
    set_seed(int(cfg.seed))
    use_cpu = not torch.cuda.is_available() or str(cfg.device) == "cpu"
    args = DPOConfig(
        output_dir=str(workdir),
        beta=float(cfg.beta),
        learning_rate=float(cfg.train.learning_rate),
        num_train_epochs=float(cfg.train.epochs),
        per_device_train_batch_size=int(cfg.train.batch_pairs),
        precompute_ref_log_probs=True,
        max_length=None,
        loss_type=["sigmoid"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        use_cpu=use_cpu,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        # TRL defaults to bf16 autocast and gradient checkpointing: bf16 moved its
        # reference log-probs by up to 0.19 nats per pair from a float32 forward
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
    )
    data = Dataset.from_list([{k: e[k] for k in COLUMNS} for e in examples])

    class TokenIdDPOTrainer(DPOTrainer):
        """The pairs are token ids exactly as sampled (decoding and re-tokenizing could change
        them, and with them the log-likelihoods the labels came from): TRL's text preparation
        is skipped and its collator takes the ids.  The reference log-probs are the ones the
        labels used, from the stored logits (TRL reads `ref_*_logps` columns when
        precompute_ref_log_probs is on), so TRL's own reference pass over every pair, a third
        of the build on 2 cores, is not run; one batch of it is, as a check."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    trainer = TokenIdDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    if not cfg.progress:  # without a bar the Trainer prints every step's log dict instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def train_dpo(
    cfg: DictConfig, model, tok, examples: list[dict], workdir: Path, token_bound: float
) -> dict:
    """Trains the policy `model` by DPO (`dpo_trainer`); returns the training record.  Two
    checks stop the build with one line, before anything is cached: TRL's reference
    log-probs against ours on the first batch (`check_reference`), and the first loss
    against ln 2 (`first_loss_callback`)."""
    import torch

    compact = bool(cfg.train.get("compact_lm_head", False))
    with torch_threads(cfg.get("threads")) as threads, compact_lm_head(compact):
        trainer = dpo_trainer(cfg, model, tok, examples, workdir)
        # TRL's reference log-probs (float32 HF forward, before any step) against ours (stored
        # logits) on the first batch: the same tokens, so they agree to the codec's precision
        first = [{k: e[k] for k in COLUMNS[:3]} for e in examples[: int(cfg.train.batch_pairs)]]
        with torch.no_grad():
            batch = trainer.data_collator(first)
            ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
        ref = torch.cat([ref_c, ref_r]).double().cpu().numpy()
        ours = np.array(
            [e["ref_chosen_logps"] for e in examples[: len(first)]]
            + [e["ref_rejected_logps"] for e in examples[: len(first)]]
        )
        lengths = np.array(
            [len(e["chosen_ids"]) for e in first] + [len(e["rejected_ids"]) for e in first]
        )
        ref_diff, ref_bound = check_reference(ref, ours, lengths, token_bound)
        seq_bound = float(max(len(e["chosen_ids"]) for e in examples)) * token_bound
        gate = first_loss_callback(float(cfg.beta), seq_bound)
        trainer.add_callback(gate)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    if not gate.checked:
        raise EngineError(
            "the first DPO loss was never logged (logging_steps or TRL's log keys "
            "changed): the build cannot be checked; nothing was cached"
        )
    logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/accuracies" in h]
    last_epoch = [h for h in logs if h["epoch"] > float(cfg.train.epochs) - 1 + 1e-9] or logs[-1:]
    return {
        "steps": int(trainer.state.global_step),
        "train_seconds": seconds,
        "threads": threads,
        "final_loss": float(np.mean([h["loss"] for h in last_epoch])),
        "reward_accuracy": float(np.mean([h["rewards/accuracies"] for h in last_epoch])),
        "first_loss": float(logs[0]["loss"]) if logs else float("nan"),
        "ref_logp_max_abs_diff": ref_diff,
        CHECKS: {
            "ref_logp_max_abs_diff": ref_diff,
            "ref_logp_bound": ref_bound,
            "token_bound": token_bound,
            "first_loss": float(logs[0]["loss"]) if logs else float("nan"),
            "first_loss_tolerance": first_loss_tolerance(float(cfg.beta), seq_bound),
        },
        "log": [
            {
                k: h[k]
                for k in ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins")
                if k in h
            }
            for h in logs
        ],
    }


# ---- the run --------------------------------------------------------------------------------------
def run(cfg: DictConfig, model: LoadedModel | None = None) -> dict:
    validate(cfg)
    prompts = load_prompts(cfg.prompts.texts, cfg.prompts.file, cfg.prompts.get("take"))
    bid = settings_id(cfg, prompts, ID_KEYS)
    cache = Path(os.path.expanduser(str(cfg.paths.cache_dir)))
    final = build_dir(cache, str(cfg.name), bid)
    done = read_build(final)
    if done is not None and CHECKS not in done.provenance:
        log.warning("%s was built before twins were checked: building it again", final)
        done = None
    if done is not None and not cfg.overwrite:
        record_latest(cache, str(cfg.name), bid)
        log.info("%s is built already: %s", cfg.name, final)
        return {"name": str(cfg.name), "path": str(final), "cached": True, **done.provenance}
    if cfg.train.get("compact_lm_head") and not cfg.candidates_only:
        trl_position_choice()  # before minutes of work, not after
    t_start = time.perf_counter()

    # 1. candidates (the engine's own dump; resumable), shared by every build that differs
    #    only in labels or training (an alpha sweep samples once)
    cand = candidates_path(cache, settings_id(cfg, prompts, CANDIDATE_KEYS))
    if cand.is_file() and unchecked(cand):
        log.warning("%s predates the run self-check: sampling the candidates again", cand)
        cand.unlink()
    if not cand.is_file():
        dcfg = cfg.copy()
        with open_dict(dcfg):
            dcfg.out, dcfg.capture = str(cand), []
            dcfg.lens, dcfg.lens_layers, dcfg.lens_topk = False, "all", 5  # no lens: not a run key
            dcfg.shard, dcfg.num_shards = 0, 1  # one process samples them all
            dcfg.resume = cand.with_name(cand.name + ".partial").exists()
            dcfg.overwrite = False
        dump.run(dcfg, model=model)
    t_cand = time.perf_counter() - t_start
    if cfg.candidates_only:
        log.info("candidates of %s: %s", cfg.name, cand)
        return {
            "name": str(cfg.name),
            "stopped": "candidates",
            "candidates": str(cand),
            "candidates_seconds": t_cand,
        }
    work = final.with_name(f".build-{final.name}")
    work.mkdir(parents=True, exist_ok=True)

    # 2-4. log pi_ref from the stored logits, pairs, labels
    with Archive(cand) as a:
        s, gen = a.samples(), a.model()
        logp = completion_logprobs(a, bool(cfg.progress))
        labels = bradley_terry_labels(
            logp,
            s["length"],
            int(cfg.n_samples),
            int(cfg.min_tokens),
            float(cfg.alpha),
            float(cfg.noise),
            int(cfg.label_seed),
        )
        if not labels:
            raise EngineError(
                f"no pair reaches min_tokens={cfg.min_tokens}: lower it or raise max_new_tokens"
            )
        examples = [
            {
                "prompt_ids": gen.prompt_tokens(lb["prompt"]),
                "chosen_ids": [int(t) for t in s["tokens"][lb["chosen"], : lb["length"]]],
                "rejected_ids": [int(t) for t in s["tokens"][lb["rejected"], : lb["length"]]],
                "ref_chosen_logps": lb["logp_a"] if lb["chosen"] == lb["a"] else lb["logp_b"],
                "ref_rejected_logps": lb["logp_b"] if lb["chosen"] == lb["a"] else lb["logp_a"],
            }
            for lb in labels
        ]
        if gen.self_check is None:
            raise EngineError(
                f"{cand} has no run self-check (all first-batch samples empty): "
                f"delete it and raise max_new_tokens"
            )
        token_bound = float(gen.self_check["bound"])  # per entry of log pi_ref (nats)
        reference = {
            k: gen.provenance.get(k)
            for k in ("source", "name", "weights_sha256", "vocab_hash", "dtype")
        }
        reference["key"] = gen.key
    labels_json = json.dumps(labels, sort_keys=True)
    (work / "labels.json").write_text(labels_json)
    agree = float(
        np.mean([(lb["chosen"] == lb["a"]) == (lb["logp_a"] >= lb["logp_b"]) for lb in labels])
    )
    log.info(
        "%d pairs; the label agrees with the higher log-likelihood in %.0f%%",
        len(labels),
        100 * agree,
    )

    # 5. DPO on a fresh HuggingFace copy of the reference (the candidates came from the bridge)
    hf_model, tok, _ = load_hf_source(ModelSpec.from_node(cfg.model), cfg.paths.cache_dir)
    record = train_dpo(cfg, hf_model, tok, examples, work / "trainer", token_bound)

    # 6. the model directory, its provenance, the atomic rename
    shutil.rmtree(work / "trainer", ignore_errors=True)
    hf_model.config.use_cache = True  # TRL turns it off for training; generation needs it
    hf_model.save_pretrained(work)
    tok.save_pretrained(work)
    if not cfg.keep_candidates:
        cand.unlink(missing_ok=True)  # the next build samples them again (a build beside this
        # one may have deleted them first)
    prov = {
        "build_id": bid,
        "name": str(cfg.name),
        "reference": reference,
        "alpha": float(cfg.alpha),
        "beta": float(cfg.beta),
        "noise": float(cfg.noise),
        "predicted_gamma": 1 + float(cfg.alpha) / float(cfg.beta),
        "k": int(cfg.n_samples),
        "max_new_tokens": int(cfg.max_new_tokens),
        "min_tokens": int(cfg.min_tokens),
        "temperature": float(cfg.temperature),
        "seed": int(cfg.seed),
        "label_seed": int(cfg.label_seed),
        "train": OmegaConf.to_container(cfg.train),
        "n_prompts": len(prompts),
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "n_pairs": len(labels),
        "labels_sha256": hashlib.sha256(labels_json.encode()).hexdigest(),
        "label_agrees_with_likelihood": agree,
        **package_versions(),
        "candidates_seconds": t_cand,  # the libraries it was built with
        "weights_sha256": sha256_file(work / "model.safetensors"),
        **record,
        "build_seconds": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (work / PROVENANCE).write_text(json.dumps(prov, indent=2, sort_keys=True))
    atomic_replace(work, final, replace_dir=True)  # overwrite=true: the old build goes only now
    record_latest(cache, str(cfg.name), bid)
    log.info("built %s in %.0f s: %s", cfg.name, prov["build_seconds"], final)
    return {"name": str(cfg.name), "path": str(final), "cached": False, **prov}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="align")
def main(cfg: DictConfig) -> None:
    with user_errors():
        r = run(cfg)
    if r.get("stopped") == "candidates":
        print(f"candidates for {r['name']} ({r['candidates_seconds']:.0f} s): {r['candidates']}")
        return
    state = "cached" if r["cached"] else f"built in {r['build_seconds']:.0f} s"
    print(
        f"{r['name']} ({state}): {r['n_pairs']} pairs, alpha {r['alpha']:g}, beta {r['beta']:g} "
        f"(predicted gamma {r['predicted_gamma']:.2f}); final DPO loss {r['final_loss']:.4f}, "
        f"reward accuracy {r['reward_accuracy']:.3f}"
    )
    print(f"model: {r['path']}")
