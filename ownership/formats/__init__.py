"""Checkpoint sources and back-ends, with the same verbs: list entries from headers, read a key with a selection,
touching only owned bytes.

`open_checkpoint(path, *, mmap=True)` takes a file, an index, or an adapter or model folder; the back-ends are
`SafetensorsFile`, `TorchFile` (`.bin`/`.pt`, read through an allow-listed reading of the pickle) and
`ShardedCheckpoint`. Below them: the read planner (`spans`), copying reads (`pread`), mapped views (`mapped`),
the one dtype table (`dtypes`), and ownership's own shard files (`shardfile`).

Example:
    >>> from ownership.formats import open_checkpoint  # a file, an index, or an adapter/model folder
"""

from __future__ import annotations

from ownership.formats.base import ByteRuns, Checkpoint, Entry, ReadStats
from ownership.formats.detect import open_checkpoint
from ownership.formats.safetensors_file import SafetensorsFile
from ownership.formats.sharded import ShardedCheckpoint
from ownership.formats.torch_file import TorchFile, WholeFileReadWarning

__all__ = [
    "ByteRuns",
    "Checkpoint",
    "Entry",
    "ReadStats",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "TorchFile",
    "WholeFileReadWarning",
    "open_checkpoint",
]
