"""`python -m engine <verb> [args]`: dump, score, perturb, align, answers (Hydra) and inspect,
merge, verify (plain arguments).

The verb is popped before Hydra reads sys.argv.  Config-group choices (`model=`, `prompts=`)
are checked here so that a typo gets one line instead of Hydra's multi-line report.
"""

from __future__ import annotations

import importlib
import sys

from engine.cli import check_group_choices, check_launcher, user_errors
from engine.extras import VERBS, require

USAGE = """usage: python -m engine <verb> [args]
  dump     sample completions, store every step's full logits (Hydra: key=value overrides)
  score    teacher-force a second model over an archive's completions, store its logits
  perturb  cut, edit and resample completions (attractor states), with matched controls
  align    DPO-train a twin of a model on typicality-biased labels of its own completions
  answers  exact probability of every candidate answer of an enumerable prompt (full logits)
  merge    join the shards of a sharded dump (dump shard=i num_shards=n) into one archive
  inspect  summarise an archive, show top-k next tokens, render completions (no model)
  verify   recompute every sample's checksums: are the stored bytes the ones written?"""
PLAIN_VERBS = ("inspect", "merge", "verify")  # argparse, no Hydra
HYDRA_VERBS = {"dump": "engine.dump", "score": "engine.score", "perturb": "engine.perturb",
               "align": "engine.align", "answers": "engine.answers"}
GROUPS = ("model", "prompts", "candidates")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*PLAIN_VERBS, *HYDRA_VERBS):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    verb = sys.argv.pop(1)
    if verb in PLAIN_VERBS:
        sys.exit(importlib.import_module(f"engine.{verb}").main(sys.argv[1:]))
    with user_errors():  # a missing optional dependency: one line naming the extra
        require(VERBS[verb], f"python -m engine {verb}")
    check_group_choices(sys.argv[1:], GROUPS)
    check_launcher(sys.argv[1:])
    importlib.import_module(HYDRA_VERBS[verb]).main()


if __name__ == "__main__":
    main()
