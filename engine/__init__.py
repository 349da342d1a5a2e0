"""Logit engine: sample from a hooked model and stream every step's full next-token logits
into a crash-safe, self-describing HDF5 archive (see docs/archive-format.md).

The folders show the flow, one way (enforced by the import-linter contracts in
`.importlinter`):
  engine/commands/  the verbs of `python -m engine` (one module each; `VERBS` lists them)
  engine/runtime/   model sources, sampling and teacher forcing, typed settings, the one
                    write lifecycle, the batch schedule (imports torch)
  engine/stream.py  archive rows -> kernels, in bounded memory
  engine/archive/   the HDF5 contract: format, writer, reader, codecs, checksums (no torch)
  kernels/          pure functions over logit rows (numba, torch)
  analyses/         read archives through stream and kernels; never load a model
and below every layer the shared vocabulary: `errors`, `files` (atomic replacement),
`config` (where the configs are) and `cli` (one-line user errors).
"""

from engine.errors import EngineError

__all__ = ["EngineError"]
