"""`python -m engine <verb> [args]`: the verbs of `engine.commands.VERBS`.

The verb is popped before Hydra reads sys.argv.  Config-group choices (`model=`, `prompts=`)
are checked here so that a typo gets one line instead of Hydra's multi-line report.
"""

from __future__ import annotations

import importlib
import sys

from engine.cli import check_group_choices, check_launcher, user_errors
from engine.commands import VERBS, usage
from engine.extras import require

GROUPS = ("model", "prompts", "candidates")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in VERBS:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    verb = VERBS[sys.argv.pop(1)]
    if not verb.hydra:
        sys.exit(importlib.import_module(verb.module).main(sys.argv[1:]))
    with user_errors():  # a missing optional dependency: one line naming the extra
        require(verb.extra, f"python -m engine {verb.name}")
    check_group_choices(sys.argv[1:], GROUPS)
    with user_errors():  # a typo in model.KEY= is one line
        from engine.runtime.settings import check_model_overrides

        check_model_overrides(sys.argv[1:])
    check_launcher(sys.argv[1:])
    importlib.import_module(verb.module).main()


if __name__ == "__main__":
    main()
