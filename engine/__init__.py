"""Logit engine: sample from a hooked model and stream every step's full next-token logits
into a crash-safe, self-describing HDF5 archive (see docs/archive-format.md).

Data flow, one way: model source (`engine.models`) -> sampling loop with a logits hook
(`engine.sampling`) -> run orchestration (`engine.run`; verbs `dump`, `score`, `perturb`)
-> archive package (`engine.archive`: format, writer, reader; no torch) -> streaming
(`engine.stream`) -> kernels (`kernels`) -> analyses (`analyses`).  The layers are enforced
by the import-linter contracts in `.importlinter`.  Verbs without a model read and write
archives through the archive package alone: `inspect`, `merge` (shards into one archive) and
`verify` (recompute every sample's checksums).
"""

from engine.errors import EngineError

__all__ = ["EngineError"]
