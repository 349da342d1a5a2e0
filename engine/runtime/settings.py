"""Typed settings: what a command reads from its Hydra config, checked once where it starts.

A command turns its `DictConfig` into these frozen objects (`from_cfg`); everything below the
command (`engine.runtime`) takes them, never a `DictConfig`.  Each check raises one
`EngineError` line naming the key.  Defaults live in the YAML (conf/run/default.yaml,
conf/sampling/default.yaml, conf/model/*.yaml), not here: `from_cfg` reads keys that the
config must have.

`ModelSpec` is the schema of a model config (conf/model/*.yaml): an unknown key (a typo such
as `dtyp`) is refused at start-up with the keys it may have been.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from engine.archive import codecs
from engine.config import CONF, options
from engine.errors import EngineError


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def _choose(what: str, value, allowed) -> None:
    if value not in allowed:
        raise EngineError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


# ---- models ----------------------------------------------------------------------------------
SOURCES = ("hf", "gguf", "smollm2", "tiny-random", "tempered", "aligned")


@dataclass(frozen=True)
class ModelSpec:
    """One model config (conf/model/*.yaml).  `record` is the config as given (resolved):
    what run keys and provenance store, so they stay what they were before the schema."""

    source: str
    name: str | None = None
    key: str | None = None  # the archive group name; null: derived (see `group`)
    path: str | None = None  # gguf: the file
    revision: str | None = None  # hf: a hub revision
    dtype: str = "auto"
    seed: int = 0  # tiny-random: its weights' seed
    build: str | None = None  # aligned: a build id (null: the newest)
    build_command: str | None = None  # aligned: how to make one
    base: str | None = None  # tempered: the model config it tempers
    gamma: float | None = None  # tempered: the power
    record: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_node(cls, node) -> ModelSpec:
        given = _plain(node)
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "record"]
        for k in given:
            if k not in fields:
                near = difflib.get_close_matches(k, fields, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise EngineError(
                    f"model config has no key {k!r}{hint}; a model config has: {', '.join(fields)}"
                )
        if given.get("source") not in SOURCES:
            raise EngineError(
                f"unknown model source {given.get('source')!r}; choose one of {', '.join(SOURCES)}"
            )
        return cls(**{k: v for k, v in given.items()}, record=given)

    @property
    def group(self) -> str:
        """The archive group name: `key`, or (key: null, as in the generic `hf` and `gguf`
        configs) one derived from what it loads: the hub or directory name's last part, or the
        GGUF file's stem (`model=hf model.name=Qwen/Qwen2.5-0.5B` -> Qwen2.5-0.5B)."""
        if self.key:
            return str(self.key)
        src = str(self.path or "") if self.source == "gguf" else str(self.name or "")
        stem = Path(src.rstrip("/")).name.removesuffix(".gguf")
        if not stem:
            raise EngineError(
                "model.key is null and there is no model.name or model.path to "
                "name the group after; pass model.key=NAME"
            )
        return stem


def model_key(node) -> str:
    """The archive group name of a model config node (see `ModelSpec.group`)."""
    return ModelSpec.from_node(node).group


def model_config(name: str) -> ModelSpec:
    """The model config conf/model/<name>.yaml (for sources that name another model)."""
    path = CONF / "model" / f"{name}.yaml"
    if not path.is_file():
        raise EngineError(f"unknown model {name!r}; available: {', '.join(options('model'))}")
    return ModelSpec.from_node(OmegaConf.load(path))


def model_for(key: str, provenance: dict) -> str:
    """The `model=` override that loads the model an archive group was written by: a config
    whose key is the group's, else one of the same source and name, else the generic source."""
    by_key, by_name = None, None
    for name in options("model"):
        c = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
        if str(c.get("key")) == key:
            by_key = by_key or name
        if c.get("source") == provenance.get("source") and str(c.get("name")) == provenance.get(
            "name"
        ):
            by_name = by_name or name
    if by_key or by_name:
        return f"model={by_key or by_name}"
    source = provenance.get("source", "hf")
    if source == "gguf":
        return f"model=gguf model.path={provenance.get('path', 'FILE.gguf')}"
    return f"model=hf model.name={provenance.get('name', 'NAME')}"


def check_model_overrides(args: list[str]) -> None:
    """`model.KEY=value` overrides on the command line must name a key of the schema (Hydra
    would accept `+model.dtyp=` and report `model.dtyp=` in several lines)."""
    fields = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "record"]
    for arg in args:
        name, eq, _ = arg.partition("=")
        name = name.lstrip("+~")
        if eq and name.startswith("model.") and name.count(".") == 1:
            k = name.split(".", 1)[1]
            if k not in fields:
                near = difflib.get_close_matches(k, fields, n=1)
                hint = f" (did you mean model.{near[0]}?)" if near else ""
                raise EngineError(
                    f"model.{k}: no such model setting{hint}; a model config "
                    f"has: {', '.join(fields)}"
                )


# ---- how rows are stored -----------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    codec: str  # fp16 | fp32 | bf16 | q16
    window: float  # q16: nats below the row max kept

    @classmethod
    def of(cls, codec, window) -> Codec:
        codecs.check_codec(codec, window)
        return cls(str(codec), float(window))


# ---- sampling ----------------------------------------------------------------------------------
ON_NONFINITE = ("fail", "record")


@dataclass(frozen=True)
class Sampling:
    """conf/sampling/default.yaml: how completions are drawn (the stored logits are always the
    raw ones, before temperature, top-k and top-p)."""

    n_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    on_nonfinite: str

    @classmethod
    def from_cfg(cls, cfg) -> Sampling:
        if not (isinstance(cfg.n_samples, int) and cfg.n_samples > 0):
            raise EngineError(f"n_samples must be a positive integer, got {cfg.n_samples}")
        if not (isinstance(cfg.max_new_tokens, int) and cfg.max_new_tokens >= 0):
            raise EngineError(f"max_new_tokens must be an integer >= 0, got {cfg.max_new_tokens}")
        if not cfg.temperature > 0:
            raise EngineError(f"temperature must be > 0, got {cfg.temperature}")
        if not (isinstance(cfg.top_k, int) and cfg.top_k >= 0):
            raise EngineError(f"top_k must be an integer >= 0 (0 = off), got {cfg.top_k}")
        if not 0 < cfg.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
        _choose("on_nonfinite", cfg.on_nonfinite, ON_NONFINITE)
        return cls(
            int(cfg.n_samples),
            int(cfg.max_new_tokens),
            float(cfg.temperature),
            int(cfg.top_k),
            float(cfg.top_p),
            int(cfg.seed),
            str(cfg.on_nonfinite),
        )


# ---- the run group (conf/run/default.yaml) and where output goes --------------------------------
@dataclass(frozen=True)
class Output:
    """Where an archive goes and what may happen to files already there."""

    out: Path | None  # the archive (None: the verb writes into an existing archive)
    resume: bool | str  # true, false, or the path of a `.partial` to continue
    overwrite: bool
    run_dir: Path | None  # this run's Hydra directory (None without Hydra)

    @classmethod
    def from_cfg(cls, cfg) -> Output:
        resume = cfg.resume
        if isinstance(resume, str) and resume.lower() in ("true", "false"):
            resume = resume.lower() == "true"
        try:
            run_dir = Path(str(cfg.paths.output_dir)).expanduser().resolve()
        except Exception:  # no Hydra run directory (plain compose): nothing to search
            run_dir = None
        out = cfg.get("out")
        return cls(
            None if out is None else Path(str(out)).expanduser().resolve(),
            resume if isinstance(resume, str) else bool(resume),
            bool(cfg.overwrite),
            run_dir,
        )


@dataclass(frozen=True)
class RunSettings:
    """The settings every archive-writing verb shares (conf/run/default.yaml)."""

    batch_size: int | str  # a positive integer, or auto (resolved by device when loaded)
    device: str  # auto | cpu | cuda | cuda:N
    codec: Codec
    progress: bool
    device_map: str | None
    deterministic: bool
    write_thread: bool
    cache_dir: str
    across: bool = True  # sampling batches may straddle prompts (engine.runtime.schedule)

    @classmethod
    def from_cfg(cls, cfg, codec: str | None = None) -> RunSettings:
        """`codec`: the verb's resolved codec, when it is not cfg.codec (score: the
        generator's)."""
        b = cfg.batch_size
        if b != "auto" and not (isinstance(b, int) and b > 0):
            raise EngineError(f"batch_size must be a positive integer or auto, got {b}")
        return cls(
            b,
            str(cfg.device),
            Codec.of(codec or cfg.codec, cfg.q16_window),
            bool(cfg.progress),
            cfg.device_map,
            bool(cfg.deterministic),
            bool(cfg.write_thread),
            str(cfg.paths.cache_dir),
            bool(cfg.get("batch_across_prompts", True)),
        )

    def with_(self, **kw) -> RunSettings:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class Sharding:
    """shard=i num_shards=n: this process writes shard i of n (n = 1: not sharded)."""

    index: int
    count: int

    @classmethod
    def from_cfg(cls, cfg) -> Sharding:
        index, count = cfg.shard, cfg.num_shards
        if not (isinstance(count, int) and count >= 1):
            raise EngineError(f"num_shards must be a positive integer, got {count}")
        if not (isinstance(index, int) and 0 <= index < count):
            raise EngineError(
                f"shard must be an integer in 0..{count - 1} (num_shards={count}), got {index}"
            )
        return cls(index, count)


@dataclass(frozen=True)
class Shape:
    """What a fresh archive is created with (besides its model and prompts)."""

    n_samples: int  # per prompt
    max_new_tokens: int
    config_yaml: str  # the command's whole config, as the archive records it
