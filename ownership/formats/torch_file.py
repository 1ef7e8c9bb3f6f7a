"""PyTorch `.bin`/`.pt` state dicts, memory-mapped so only the owned bytes are paged in.

Files are opened with `torch.load(mmap=True, weights_only=True)`: unpickling builds tensors over the mapped file
without reading their data, and `weights_only` refuses anything but plain tensors and containers, so an
arbitrary pickle is never executed. An old (non-zip) pickle cannot be memory-mapped; it is still loaded safely,
whole, with a `WholeFileReadWarning`.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/w.bin"
    >>> torch.save({"w": torch.arange(6.0).reshape(3, 2)}, path)
    >>> with TorchFile(path) as f:
    ...     f.entries()[0].shape, f.read("w", (((1, 3, 1),), None)).tolist()
    ((3, 2), [[2.0, 3.0], [4.0, 5.0]])
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ownership.errors import CheckpointError
from ownership.formats.entry import Checkpoint, Entry, ReadStats, check_selection, dtype_name
from ownership.formats.rows import RowReader
from ownership.formats.take import take
from ownership.selection import Selection, selection_read_count

__all__ = ["TorchFile", "WholeFileReadWarning"]


class WholeFileReadWarning(UserWarning):
    """A checkpoint had to be read whole (an old non-zip pickle): peak memory is the whole file."""


class TorchFile(Checkpoint):
    """One `.bin`/`.pt` file holding a flat state dict of tensors."""

    kind = "torch"

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
        self.mapped = True
        self._state = self._load(path)
        self._offsets = _file_offsets(path, self._state) if self.mapped else {}
        self._entries = [
            Entry(key, dtype_name(t.dtype), tuple(t.shape), path.name, offset=self._offsets.get(key))
            for key, t in self._state.items()
        ]
        self._reader = RowReader(path, stats=self.stats, display=self.display)

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise CheckpointError("no such file", source=self.display, fix="check the path")
        mmap = zipfile.is_zipfile(path)
        if not mmap:
            self.mapped = False
            warnings.warn(
                f"{self.display} is an old non-zip pickle that cannot be memory-mapped: it is read whole, so peak "
                "memory is the whole file. Re-save it with torch.save or as safetensors to read only owned bytes.",
                WholeFileReadWarning,
                stacklevel=4,
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                "refused to unpickle: the file holds more than plain tensors",
                source=self.display,
                found=str(error).splitlines()[0][:200],
                expected="a state dict of tensors (torch.load weights_only=True)",
                fix="convert the checkpoint to safetensors with a tool you trust; it was not executed",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as error:
            raise CheckpointError(
                "cannot read the PyTorch checkpoint",
                source=self.display,
                found=str(error).splitlines()[0][:200] if str(error) else type(error).__name__,
                expected="a file written by torch.save",
                fix="re-download or re-save the file",
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(
                "not a state dict",
                source=self.display,
                found=type(state).__name__,
                expected="a dict of tensor name to tensor",
                fix="save model.state_dict(), not the model",
            )
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    "state dict entry is not a tensor",
                    source=self.display,
                    key=str(key),
                    found=type(value).__name__,
                    expected="a torch.Tensor under a string key",
                    fix="save a flat state dict of tensors",
                )
        if not self.mapped:
            self.stats.bytes_read += sum(t.numel() * t.element_size() for t in state.values())
        return state

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def close(self) -> None:
        self._reader.close()
        self._state = {}

    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        tensor = self._state.get(key)
        if tensor is None:
            self.entry(key)
            raise AssertionError("unreachable")  # pragma: no cover
        check_selection(selection, tuple(tensor.shape), key=key, source=self.display)
        offset = self._offsets.get(key)
        if offset is not None:
            # Read the owned rows with preadv: no mapped page of the file ever counts against this process.
            return self._reader.read(offset, tensor.dtype, tuple(tensor.shape), selection)
        self.stats.files_opened.add(str(self.root))
        if self.mapped:
            self.stats.bytes_read += (
                selection_read_count(selection, tuple(tensor.shape)) * tensor.element_size()
            )
        return take(tensor, selection)


def _file_offsets(path: Path, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """File offset of each contiguous tensor's first byte, for reading it with preadv.

    `torch.load(mmap=True)` maps the whole zip once and makes every storage a slice of that mapping, so a
    storage's address minus the mapping's base is its record's offset in the file. The base is found from the
    lowest record and checked against every other one; anything that does not fit (compressed records, another
    torch's layout) leaves the key to the memory-mapped path.
    """
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            offsets = []
            for info in archive.infolist():
                parts = info.filename.split("/")
                if len(parts) < 3 or parts[-2] != "data" or not parts[-1].isdigit():
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    return {}
                handle.seek(info.header_offset)
                local = handle.read(30)
                name_length = int.from_bytes(local[26:28], "little")
                extra_length = int.from_bytes(local[28:30], "little")
                offsets.append(info.header_offset + 30 + name_length + extra_length)
    except (OSError, zipfile.BadZipFile):
        return {}
    pointers = {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}
    if not pointers or not offsets:
        return {}
    base = min(pointers) - min(offsets)
    known = set(offsets)
    if any(pointer - base not in known for pointer in pointers):
        return {}
    return {
        key: t.untyped_storage().data_ptr() - base + int(t.storage_offset()) * t.element_size()
        for key, t in state.items()
        if t.numel() and t.is_contiguous()
    }
