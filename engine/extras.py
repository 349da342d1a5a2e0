"""The optional parts of the install (pyproject.toml's extras) and the one-line refusal when a
verb needs one that is missing.

The core install (`pip install logit-engine`) reads, inspects, verifies and merges archives and
runs the analyses that need no model; `run` adds the models (dump, score, perturb, answers),
`align` the DPO twin, `text` the analyses of completions' text (diversity, personas).
"""

from __future__ import annotations

import importlib.util

from engine.errors import EngineError

#: extra -> the modules (import names) it provides that the engine imports
EXTRAS = {
    "run": ("torch", "transformers", "transformer_lens", "accelerate", "gguf", "safetensors"),
    "align": (
        "torch",
        "transformers",
        "transformer_lens",
        "accelerate",
        "gguf",
        "safetensors",
        "trl",
        "datasets",
    ),  # the run extra's and TRL's
    "text": ("torch", "transformers", "sklearn", "vaderSentiment"),
}


def require(extra: str | None, what: str, find_spec=None) -> None:
    """Raise EngineError (one line: what needs which extra, and the install command) when a
    module of `extra` is not installed (None: nothing beyond the core).  Who needs which:
    `engine.commands.VERBS` (each verb's `extra`), `analyses.protocol.EXTRAS`."""
    if extra is None:
        return
    find_spec = find_spec or importlib.util.find_spec
    missing = [m for m in EXTRAS[extra] if find_spec(m) is None]
    if missing:
        raise EngineError(
            f"{what} needs the '{extra}' extra ({', '.join(missing)} not "
            f"installed): pip install 'logit-engine[{extra}]'"
        )
