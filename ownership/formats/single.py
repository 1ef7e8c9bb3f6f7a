"""What every one-file back-end shares: its entries by key, a row reader, and reads at an entry's offset.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from ownership.formats.safetensors_file import SafetensorsFile
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"w": torch.arange(4.0)}, path)
    >>> isinstance(SafetensorsFile(path), SingleFile)
    True
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch

from ownership.formats.entry import Checkpoint, Entry, ReadStats, check_selection, torch_dtype
from ownership.formats.rows import RowReader
from ownership.selection import Selection

__all__ = ["SingleFile"]


class SingleFile(Checkpoint):
    """A checkpoint stored in one file; subclasses say how to list its entries (`_list_entries`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: dict[str, Any] | None = None,
        display: str | None = None,
        stats: ReadStats | None = None,
    ) -> None:
        path = Path(path)
        super().__init__(path, config=config, stats=stats)
        self.display = display or str(path)
        self._reader = RowReader(path, stats=self.stats, display=self.display)
        self._entries = self._list_entries()
        self._by_key = {entry.key: entry for entry in self._entries}

    @abstractmethod
    def _list_entries(self) -> list[Entry]:
        """Every entry of the file, from its header alone; called once, by `__init__`."""

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def close(self) -> None:
        self._reader.close()

    def _checked(self, key: str, selection: Selection) -> Entry:
        """The entry of `key`, after checking that `selection` fits it."""
        entry = self._by_key.get(key) or self.entry(key)
        check_selection(selection, entry.shape, key=key, source=self.display)
        return entry

    def _read_at_offset(self, entry: Entry, selection: Selection) -> torch.Tensor:
        """Read a row-major tensor at its recorded offset."""
        assert entry.offset is not None
        dtype = torch_dtype(entry.dtype, key=entry.key, source=self.display)
        return self._reader.read(entry.offset, dtype, entry.shape, selection)
