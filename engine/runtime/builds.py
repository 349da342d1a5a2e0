"""Where `python -m engine align` keeps the models it trains, and how model configs find them.

Layout under the model cache (`paths.cache_dir`):
  aligned/<name>-<build_id[:12]>/   a HuggingFace model directory (config, safetensors,
                                    tokenizer) plus provenance.json (every setting, hash and
                                    training result of the build)
  aligned/<name>.latest             the build id of the newest complete build of that name

The build id is the sha256 of everything that decides the weights (reference model, prompts,
sampling, labels, training settings), so building twice with the same config reuses the
directory and a different config builds a different one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError
from engine.files import staged

PROVENANCE = "provenance.json"
#: provenance.json key of the build's checks (engine.commands.align: reference log-probs, first loss);
#: a build without it predates them and is refused on load
CHECKS = "checks"


#: provenance.json fields an archive records about an aligned model (`alignment` attribute)
SUMMARY_KEYS = (
    "reference",
    "alpha",
    "beta",
    "noise",
    "k",
    "max_new_tokens",
    "n_pairs",
    "steps",
    "prompts_sha256",
    "labels_sha256",
    "final_loss",
    "reward_accuracy",
    "trl",
)


@dataclass
class Build:
    path: Path
    provenance: dict  # the build's provenance.json

    @property
    def build_id(self) -> str:
        return self.provenance["build_id"]

    @property
    def weights_sha256(self) -> str:
        return self.provenance["weights_sha256"]

    @property
    def summary(self) -> str:
        """JSON of the SUMMARY_KEYS fields."""
        return json.dumps({k: self.provenance.get(k) for k in SUMMARY_KEYS}, sort_keys=True)


def build_dir(cache: Path, name: str, build_id: str) -> Path:
    return cache / "aligned" / f"{name}-{build_id[:12]}"


def read_build(path: Path) -> Build | None:
    """The build in `path` if it is complete (its provenance.json is written last)."""
    prov_path = path / PROVENANCE
    if not prov_path.is_file():
        return None
    return Build(path, json.loads(prov_path.read_text()))


def record_latest(cache: Path, name: str, build_id: str) -> None:
    with staged(cache / "aligned" / f"{name}.latest") as tmp:
        tmp.write_text(build_id + "\n")


def find_build(cache: Path, name: str, build_id: str | None, command: str) -> Build:
    """The build `build_id` of `name`, or its newest complete build; one line naming the
    command that builds it when there is none."""
    if build_id is None:
        pointer = cache / "aligned" / f"{name}.latest"
        if not pointer.is_file():
            raise EngineError(
                f"model {name!r} is not built yet in {cache}: build it with "
                f"`{command}` (about 7 minutes on 2 CPU cores, then cached)"
            )
        build_id = pointer.read_text().strip()
    build = read_build(build_dir(cache, name, str(build_id)))
    if build is None:
        raise EngineError(
            f"build {str(build_id)[:12]} of model {name!r} not found in "
            f"{cache / 'aligned'}: build it with `{command}`"
        )
    if CHECKS not in build.provenance:
        raise EngineError(
            f"model {name!r} ({build.path}) was built before twins were checked "
            f"(its reference log-probs and first DPO loss were never verified): "
            f"rebuild it with `{command} overwrite=true`"
        )
    return build
