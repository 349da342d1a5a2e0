"""Two model groups of one archive compared on identical contexts: which two, what is known of
them, and the streamed pass a pooled fit repeats (analyses `pair` and `mitigation`)."""

from __future__ import annotations

import logging

import numpy as np

import kernels as K
from engine.archive import Archive
from engine.errors import EngineError
from engine.stream import map_rows

log = logging.getLogger(__name__)


def pick_models(a: Archive, c) -> tuple[str, str, str]:
    """(base, aligned, how they were chosen): the configured groups, else the generator and
    the first other group, said so (and logged) when the archive holds more than two."""
    base = c.base or a.generator
    others = [k for k in a.models if k != base]
    aligned = c.aligned or (others[0] if others else None)
    if aligned is None:
        raise EngineError(
            f"{c.name} needs a scored archive (python -m engine score ...): only {base!r} is stored"
        )
    for k in (base, aligned):
        a.model(k)  # one clear error for an unknown group
    how = "configured" if c.aligned else "the only other group"
    if not c.aligned and len(others) > 1:
        how = (
            f"the first of {len(others)} other groups ({', '.join(others)}); choose with "
            f"analysis.aligned=NAME"
        )
        log.warning("%s: comparing %s with %s, %s", c.name, base, aligned, how)
    return base, aligned, how


def provenance_of(a: Archive, key: str) -> dict:
    """What the report needs to know of a model: where it came from, and for an aligned twin
    its alignment record (JSON with alpha, beta, predicted_gamma) or a tempered twin's gamma,
    and the group's run self-check: how far its stored rows were from a teacher-forced forward."""
    m = a.model(key)
    p = m.provenance
    out = {k: p[k] for k in ("source", "name", "revision", "alignment", "gamma") if k in p}
    # the run's self-check of this group (engine.runtime.selfcheck; None: teacher-forced or older)
    out["self_check"] = m.self_check
    return out


def moments_pass(a: Archive, key: str, sample, step):
    """moments_at(g) -> [rows, 4]: the tempered moments of group `key` at g on exactly the rows
    (`sample`, `step`) of a `map_pairs` result (rows a caller dropped, e.g. non-finite ones, are
    dropped here too), one streamed pass over those completions: what
    `kernels.pooled_from_moments` calls once per Newton step."""
    sample, step = np.asarray(sample), np.asarray(step)
    width = int(step.max()) + 1 if step.size else 1

    def moments_at(gamma):
        m, s2, t2 = map_rows(
            a,
            lambda x: K.tempered_moments(x, [gamma])[:, 0],
            key,
            samples=np.unique(sample),
            progress=False,
        )
        got = m["value"]
        if len(got) == len(sample):
            return got
        # rows come in (sample, step) order in both passes: pick the caller's
        keys = s2.astype(np.int64) * width + np.minimum(t2, width - 1)
        return got[np.searchsorted(keys, sample.astype(np.int64) * width + step)]

    return moments_at
