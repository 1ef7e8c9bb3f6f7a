"""A single safetensors file: entries from its JSON header, reads with `preadv` of exactly the owned rows.

A selection on the first dim is read run by run, each contiguous run with one `preadv` straight into the
tensor's memory; a run with a step reads row by row. Selections on other dims read the rows they span (the
bytes of a row's strided elements share its pages anyway) in bounded blocks and keep only the owned elements.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"w": torch.arange(12.0).reshape(4, 3)}, path)
    >>> with SafetensorsFile(path) as f:
    ...     f.read("w", (((2, 4, 1),), None)).tolist(), f.stats.bytes_read
    ([[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]], 24)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ownership.errors import CheckpointError
from ownership.formats.entry import Checkpoint, Entry, check_selection, torch_dtype
from ownership.formats.take import take_dims
from ownership.selection import Run, Selection

__all__ = ["SafetensorsFile", "read_header"]

_MAX_HEADER = 100 * 2**20
# Rows read at once when other dims are selected: bounds staging memory independently of tensor size.
_BLOCK_BYTES = 16 * 2**20


def read_header(path: Path, *, display: str) -> tuple[list[Entry], dict[str, tuple[int, int]], int]:
    """Entries, byte ranges relative to the data section, and where the data section starts."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(display, f"{size} bytes", "at least 8 bytes of header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, _MAX_HEADER):
                raise _corrupt(
                    display,
                    f"header length {length} in a file of {size} bytes",
                    "a header that fits in the file (truncated download?)",
                )
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointError(
            "cannot read the file", source=display, found=error.strerror, fix="check the path and permissions"
        ) from None
    try:
        header: dict[str, Any] = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(display, f"a header that is not JSON ({error})", "a JSON header") from None
    if not isinstance(header, dict):
        raise _corrupt(display, "a header that is not a JSON object", "a JSON object")
    data_size = size - 8 - length
    entries: list[tuple[int, Entry]] = []
    ranges: dict[str, tuple[int, int]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                str(info["dtype"]),
                tuple(int(x) for x in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise _corrupt(
                display, f"a malformed header entry {info!r}", "dtype, shape and data_offsets", key=key
            ) from None
        entry = Entry(key, dtype, shape, path.name)
        torch_dtype(dtype, key=key, source=display)
        if not 0 <= begin <= end <= data_size:
            raise _corrupt(
                display,
                f"data offsets [{begin}, {end}] past the {data_size} data bytes",
                "offsets inside the file (truncated file?)",
                key=key,
            )
        if end - begin != entry.nbytes:
            raise _corrupt(
                display,
                f"{end - begin} bytes for shape {list(shape)} of {dtype}",
                f"{entry.nbytes} bytes",
                key=key,
            )
        entries.append((begin, entry))
        ranges[key] = (begin, end)
    entries.sort(key=lambda item: item[0])
    return [entry for _, entry in entries], ranges, 8 + length


def _corrupt(display: str, found: str, expected: str, *, key: str | None = None) -> CheckpointError:
    return CheckpointError(
        "corrupt or truncated safetensors file",
        source=display,
        key=key,
        found=found,
        expected=expected,
        fix="re-download or re-save the file",
    )


class SafetensorsFile(Checkpoint):
    """One `.safetensors` file."""

    kind = "safetensors"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: dict[str, Any] | None = None,
        display: str | None = None,
    ) -> None:
        path = Path(path)
        super().__init__(path, config=config)
        self.display = display or str(path)
        self._entries, self._ranges, self._data_start = read_header(path, display=self.display)
        self._by_key = {entry.key: entry for entry in self._entries}
        self._handle: BinaryIO | None = None

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _fd(self) -> int:
        if self._handle is None:
            self._handle = self.root.open("rb", buffering=0)
            self.stats.files_opened.add(str(self.root))
        return self._handle.fileno()

    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        entry = self._by_key.get(key) or self.entry(key)
        check_selection(selection, entry.shape, key=key, source=self.display)
        dtype = torch_dtype(entry.dtype, key=key, source=self.display)
        begin = self._data_start + self._ranges[key][0]
        if not entry.shape:
            return self._read_rows(begin, 1, dtype, ()).reshape(())
        rows, inner = (
            (None, False) if selection is None else (selection[0], any(d is not None for d in selection[1:]))
        )
        row_shape = entry.shape[1:]
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        runs: tuple[Run, ...] = rows if rows is not None else ((0, entry.shape[0], 1),)
        pieces = []
        for start, stop, step in runs:
            if step == 1:
                block_rows = max(1, _BLOCK_BYTES // max(row_bytes, 1)) if inner else max(stop - start, 1)
                for block in range(start, stop, block_rows):
                    count = min(block_rows, stop - block)
                    piece = self._read_rows(begin + block * row_bytes, count, dtype, row_shape)
                    pieces.append(take_dims(piece, selection, first=1) if inner else piece)
            else:
                for row in range(start, stop, step):
                    piece = self._read_rows(begin + row * row_bytes, 1, dtype, row_shape)
                    pieces.append(take_dims(piece, selection, first=1) if inner else piece)
        if not pieces:
            shape = list(entry.shape)
            shape[0] = 0
            return take_dims(torch.empty(shape, dtype=dtype), selection, first=1).contiguous()
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.contiguous()

    def _read_rows(
        self, offset: int, count: int, dtype: torch.dtype, row_shape: tuple[int, ...]
    ) -> torch.Tensor:
        numel = count
        for size in row_shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        fd = self._fd()
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise _corrupt(
                    self.display, f"end of file after {done} of {nbytes} bytes", "the whole tensor"
                )
            done += got
        self.stats.bytes_read += nbytes
        if nbytes == 0:
            return torch.empty((count, *row_shape), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).view(count, *row_shape)
