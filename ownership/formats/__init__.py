"""Checkpoint back-ends: list entries from headers, read one key with a selection, touching only owned bytes.

Example:
    >>> from ownership.formats import open_checkpoint  # a file, an index, or an adapter/model folder
"""

from __future__ import annotations

from ownership.formats.detect import open_checkpoint
from ownership.formats.entry import Checkpoint, Entry, ReadStats
from ownership.formats.safetensors_file import SafetensorsFile
from ownership.formats.sharded import ShardedCheckpoint
from ownership.formats.torch_file import TorchFile, WholeFileReadWarning

__all__ = [
    "Checkpoint",
    "Entry",
    "ReadStats",
    "SafetensorsFile",
    "ShardedCheckpoint",
    "TorchFile",
    "WholeFileReadWarning",
    "open_checkpoint",
]
