"""The verbs of `python -m engine`, one module each, and their one registry.

`VERBS` is read by the CLI (`engine/__main__.py`: dispatch and usage), by the docs test (every
verb documented in the README) and by the layer test (every verb module sits here).  A verb
module is imported only when it runs, so `inspect`, `merge` and `verify` never import torch.

Hydra verbs expose `main()` (a thin `@hydra.main` around `run(cfg) -> dict`); plain verbs
expose `main(argv) -> int` (argparse).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    hydra: bool  # True: key=value overrides read by Hydra; False: plain arguments
    extra: str | None  # the install extra it needs (engine/extras.py); None: the core alone

    @property
    def module(self) -> str:
        return f"engine.commands.{self.name}"


VERBS: dict[str, Verb] = {
    v.name: v
    for v in (
        Verb(
            "dump",
            "sample completions, store every step's full logits (Hydra: key=value overrides)",
            hydra=True,
            extra="run",
        ),
        Verb(
            "score",
            "teacher-force a second model over an archive's completions, store its logits",
            hydra=True,
            extra="run",
        ),
        Verb(
            "perturb",
            "cut, edit and resample completions (attractor states), with matched controls",
            hydra=True,
            extra="run",
        ),
        Verb(
            "align",
            "DPO-train a twin of a model on typicality-biased labels of its own completions",
            hydra=True,
            extra="align",
        ),
        Verb(
            "answers",
            "exact probability of every candidate answer of an enumerable prompt (full logits)",
            hydra=True,
            extra="run",
        ),
        Verb(
            "layers",
            "two models' logit lenses on an archive's tokens: KL, JS and gamma per layer",
            hydra=True,
            extra="run",
        ),
        Verb(
            "merge",
            "join the shards of a sharded dump (dump shard=i num_shards=n) into one archive",
            hydra=False,
            extra=None,
        ),
        Verb(
            "inspect",
            "summarise an archive, show top-k next tokens, render completions, write the HTML "
            "token explorer (no model)",
            hydra=False,
            extra=None,
        ),
        Verb(
            "verify",
            "recompute every sample's checksums: are the stored bytes the ones written?",
            hydra=False,
            extra=None,
        ),
    )
}


def usage() -> str:
    width = max(map(len, VERBS))
    return "usage: python -m engine <verb> [args]\n" + "\n".join(
        f"  {v.name:<{width}}  {v.help}" for v in VERBS.values()
    )
