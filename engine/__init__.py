"""Logit engine: sample from a hooked model and stream every step's full next-token logits
into a crash-safe, self-describing HDF5 archive (see docs/archive-format.md).

Data flow: model source (`engine.models`) -> sampling loop with a logits hook
(`engine.sampling`) -> archive writer (`engine.archive`) -> archive -> reader
(`engine.reader`) -> kernels (`kernels`) -> analyses (`analyses`).
"""

from engine.errors import EngineError

__all__ = ["EngineError"]
