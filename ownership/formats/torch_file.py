"""PyTorch `.bin`/`.pt` state dicts, reading only the owned bytes.

A zip file written by `torch.save` is described by `torch_pickle` (an allow-listed reading of its pickle) and
its tensors are read with `preadv` like safetensors, each record's local header in the same read as its data. A
pickle that description cannot read goes whole through `torch.load(mmap=True, weights_only=True)`, and so does
a single tensor it cannot place (not contiguous, a compressed record): tensors over the mapped file, data
untouched until a selection is copied; `weights_only` refuses anything but plain tensors and containers, so an
arbitrary pickle is never executed. An old (non-zip) pickle cannot be memory-mapped; it is still loaded safely, whole, with a
`WholeFileReadWarning`.

Example:
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/w.bin"
    >>> torch.save({"w": torch.arange(6.0).reshape(3, 2)}, path)
    >>> with TorchFile(path) as f:
    ...     f.entries()[0].shape, f.read("w", (((1, 3, 1),), None)).tolist()
    ((3, 2), [[2.0, 3.0], [4.0, 5.0]])
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ownership.errors import CheckpointError
from ownership.formats.base import Entry
from ownership.formats.dtypes import dtype_name
from ownership.formats.single import SingleFile
from ownership.formats.spans import selection_read_count
from ownership.formats.torch_pickle import PickledState, data_offset_from, read_pickle
from ownership.limits import MAX_KEY_LENGTH, over_limit
from ownership.placement.selection import Selection

if TYPE_CHECKING:
    import torch

    from ownership.formats.mapped import Prelude

__all__ = ["TorchFile", "WholeFileReadWarning"]


class WholeFileReadWarning(UserWarning):
    """A checkpoint had to be read whole (an old non-zip pickle): peak memory is the whole file."""


class TorchFile(SingleFile):
    """One `.bin`/`.pt` file holding a flat state dict of tensors."""

    kind = "torch"

    mapped = True
    """False for an old non-zip pickle, which is read whole."""

    def _open(self) -> Iterator[Entry]:
        path = self.root
        self._pickled = read_pickle(path) if path.is_file() and zipfile.is_zipfile(path) else None
        self._state: dict[str, torch.Tensor] | None = None
        self._offsets: dict[str, int | None] = {}
        # Whether records' headers are still as torch.save writes them (`read_many`).
        self._predicting = True
        if self._pickled is None:
            state = self._state = self._load(path)
            return iter(
                [Entry(key, dtype_name(t.dtype), tuple(t.shape), path.name) for key, t in state.items()]
            )
        return self._entries_of(self._pickled, name=path.name)

    def _entries_of(self, pickled: PickledState, *, name: str) -> Iterator[Entry]:
        # `offset` stays None: a record's data offset needs its local header, read when the tensor is.
        for key in pickled.tensors:
            if len(key) > MAX_KEY_LENGTH:
                raise over_limit(
                    "a key of the state dict",
                    name="MAX_KEY_LENGTH",
                    found=f"{len(key):,} characters",
                    source=self.display,
                )
            try:
                dtype, shape = pickled.dtype_shape(key)
            except ValueError as error:
                raise CheckpointError(
                    "cannot read the PyTorch checkpoint",
                    source=self.display,
                    key=key,
                    found=str(error),
                    expected="a tensor record as torch.save writes it",
                    fix="re-download or re-save the file",
                ) from None
            yield Entry(key, dtype, shape, name)

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        import torch

        if not path.is_file():
            raise CheckpointError("no such file", source=self.display, fix="check the path")
        mmap = _sniff(path, display=self.display)
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
                found=_reason(error),
                expected="a state dict of tensors (torch.load weights_only=True)",
                fix="convert the checkpoint to safetensors with a tool you trust; it was not executed",
            ) from None
        except Exception as error:
            # weights_only=True ran no code from the file, so whatever failed is the file's content (or torch's
            # reader of it: old pickles of float8 storages raise AttributeError); one error names the file.
            raise CheckpointError(
                "cannot read the PyTorch checkpoint",
                source=self.display,
                found=_reason(error),
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
                    found=type(value).__name__ if isinstance(key, str) else f"a {type(key).__name__} key",
                    expected="a torch.Tensor under a string key",
                    fix="save a flat state dict of tensors",
                )
        if not self.mapped:
            self.stats.bytes_read += sum(t.numel() * t.element_size() for t in state.values())
        return state

    def close(self) -> None:
        super().close()
        # Tens of thousands of records: freed now, not left for the cyclic collector to scan.
        self._state = self._pickled = None

    def data_offset(self, key: str) -> int | None:
        """File offset of a tensor's first byte, or None where it is not stored row-major and uncompressed."""
        entry = self._by_key.get(key) or self.entry(key)
        key = entry.key
        if key not in self._offsets:
            where = None if self._pickled is None else self._pickled.location(key)
            offset = None
            if where is not None:
                offset = data_offset_from(self._reader.peek(where.record, 30), where.record) + where.within
            self._offsets[key] = offset
        return self._offsets[key]

    def _data_offset(self, entry: Entry) -> int | None:
        return self.data_offset(entry.key)

    def _locate(self, entry: Entry) -> tuple[int | None, Prelude | None]:
        # A record's local header is read in the same call as its data, at the length torch.save gives it,
        # instead of being read first (`_confirm` checks it); so is the data descriptor that ends the record
        # before, so that records back to back are one read.
        where = lead = None
        if self._predicting and self._pickled is not None and entry.key not in self._offsets:
            where, lead = self._pickled.location(entry.key), self._pickled.descriptor
        if where is None or lead is None or where.record < lead:
            return self.data_offset(entry.key), None
        return where.record + where.header + where.within, (
            where.record - lead,
            bytearray(lead + where.header),
        )

    def _confirm(self, entry: Entry, offset: int, prelude: Prelude) -> int | None:
        start, read = prelude
        lead = self._pickled.descriptor if self._pickled is not None else 0
        header, record = read[lead:], start + lead
        if _header_holds(header, record=record):
            self._offsets[entry.key] = offset
            return None
        # Not as torch.save writes it: this file's headers are read before their data from now on.
        self._predicting = False
        return self.data_offset(entry.key)

    def _read_other(self, entry: Entry, selection: Selection) -> torch.Tensor:
        # Through torch.load(mmap=True): the mapped file's pages are touched only for the selection.
        with self._lock:
            if self._state is None:
                self._state = self._load(self.path)
            state = self._state
        tensor = state[entry.key]
        self.stats.files_opened.add(str(self.path))
        if self.mapped:
            # Through the reader's lock: this runs on reader threads too.
            self._reader._count(selection_read_count(selection, tuple(tensor.shape)) * tensor.element_size())
        from ownership.formats.take import take

        return take(tensor, selection)


def _header_holds(header: bytearray, *, record: int) -> bool:
    """Whether a record's local header, read with its data, is as long as predicted (`len(header)`)."""
    if len(header) < 30:
        return False
    try:
        return data_offset_from(bytes(header[:30]), record) == record + len(header)
    except zipfile.BadZipFile:
        return False


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80


def _sniff(path: Path, *, display: str) -> bool:
    """True for a zip written by `torch.save` (memory-mappable), False for an old pickle; else an error.

    A zip whose central directory is missing is a truncated download, not an old pickle: saying so beats a
    `WholeFileReadWarning` followed by an unpickling error.
    """
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(_ZIP_MAGIC):
        if zipfile.is_zipfile(path):
            return True
        raise CheckpointError(
            "corrupt or truncated PyTorch checkpoint",
            source=display,
            found="a zip file without its central directory",
            expected="a complete zip written by torch.save (truncated download?)",
            fix="re-download or re-save the file",
        )
    if head[:1] != bytes([_PICKLE_PROTO]):
        raise CheckpointError(
            "not a PyTorch checkpoint",
            source=display,
            found=f"a file starting with {head!r}",
            expected="a zip or a pickle written by torch.save",
            fix="check the file; re-download or re-save it",
        )
    return False


def _reason(error: Exception) -> str:
    """The sentence of a torch.load error that says what was wrong.

    torch wraps it in advice about the weights_only default and `add_safe_globals`; neither is advice to give
    for a file that failed to load safely, so only the reason is kept.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return _first_sentence(rest or (lines[i + 1] if i + 1 < len(lines) else ""), error=error)
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "Please file an issue",
        "(1)",
        "(2)",
    )
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return _first_sentence(reasons[0] if reasons else "", error=error)


def _first_sentence(text: str, *, error: Exception) -> str:
    return text.split(". ", 1)[0].removesuffix(".")[:200] or type(error).__name__
