"""The archive package: the HDF5 layout of docs/archive-format.md, with no torch.

format   every name, constant and enum of the spec, in the spec's order
codecs   numpy decoding of the logit codecs (encoding is the run layer's: engine.runtime.encode)
writer   creating archives and model groups, streaming `Rows` into them, lineage, answers
merged   writing a merged archive from its shards (virtual or copied rows, checksums)
checksums  per-sample xxh3_64 of a group's stored rows (writer, verify, merge --copy)
reader   `Archive` / `ModelView`: validation, named accessors, chunk-aligned streaming
chunks   where rows lie in files: zero-copy mapped chunks, readahead advice (shards too)
text     token ids -> text from the tokenizer record an archive keeps
"""

from engine.archive.format import Shard
from engine.archive.merged import write_merged
from engine.archive.reader import Archive, Block, ModelView
from engine.archive.text import Text
from engine.archive.writer import (
    ArchiveWriter,
    ModelInfo,
    ModelWriter,
    Rows,
    add_model_group,
    create,
    open_for_resume,
    open_scored_group,
)

__all__ = [
    "Archive",
    "ArchiveWriter",
    "Block",
    "ModelInfo",
    "ModelView",
    "ModelWriter",
    "Rows",
    "Shard",
    "Text",
    "add_model_group",
    "create",
    "open_for_resume",
    "open_scored_group",
    "write_merged",
]
