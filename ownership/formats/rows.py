"""Reading a selection of a row-major tensor stored at a known file offset, with `preadv` into tensor memory.

The first dim's runs are read run by run: a contiguous run is one `preadv` straight into the new tensor's
buffer, a run with a step reads row by row. When other dims are selected too, the rows a run spans are read in
blocks of at most 4 MiB and only the owned elements are kept, so staging stays bounded whatever the tensor's
size. Every byte pulled from storage is counted in the shared `ReadStats`.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from ownership.formats.entry import ReadStats
    >>> path = Path(tempfile.mkdtemp()) / "raw"
    >>> _ = path.write_bytes(torch.arange(12, dtype=torch.int32).numpy().tobytes())
    >>> reader = RowReader(path, stats=ReadStats(), display="raw")
    >>> reader.read(0, torch.int32, (4, 3), (((1, 4, 2),), ((0, 1, 1),))).tolist()
    [[3], [9]]
    >>> reader.close()
"""

from __future__ import annotations

import os
import threading
from math import prod
from pathlib import Path
from typing import BinaryIO

import torch

from ownership.errors import CheckpointError
from ownership.formats.entry import ReadStats
from ownership.formats.take import compact, take_dims
from ownership.selection import Run, Selection

__all__ = ["RowReader"]

# Rows read at once when dims after the first are selected: bounds staging memory whatever the tensor's size.
_BLOCK_BYTES = 4 * 2**20


class RowReader:
    """Reads row-major tensors out of one file; opens it on the first read."""

    def __init__(self, path: Path, *, stats: ReadStats, display: str) -> None:
        self.path = path
        self.stats = stats
        self.display = display
        self._handle: BinaryIO | None = None
        # Readers may run on several threads: opening the file and the byte count are shared.
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _fd(self) -> int:
        handle = self._handle
        if handle is None:
            with self._lock:
                if self._handle is None:
                    self._handle = self.path.open("rb", buffering=0)
                    self.stats.files_opened.add(str(self.path))
                handle = self._handle
        return handle.fileno()

    def read(
        self, offset: int, dtype: torch.dtype, shape: tuple[int, ...], selection: Selection
    ) -> torch.Tensor:
        """The selected elements of the tensor of `shape` whose bytes start at `offset`."""
        if not shape:
            return self._rows(offset, 1, dtype, ()).reshape(())
        row_shape = shape[1:]
        row_bytes = _itemsize(dtype) * prod(row_shape)
        if selection is None:
            return self._rows(offset, shape[0], dtype, row_shape)
        rows = selection[0]
        inner = any(d is not None for d in selection[1:])
        if not inner and rows is not None and len(rows) == 1 and rows[0][2] == 1:
            start, stop, _ = rows[0]
            return self._rows(offset + start * row_bytes, stop - start, dtype, row_shape)
        whole: tuple[Run, ...] = ((0, shape[0], 1),)
        pieces = []
        for start, stop, step in whole if rows is None else rows:
            if step == 1:
                block = max(1, _BLOCK_BYTES // max(row_bytes, 1)) if inner else max(stop - start, 1)
                for first in range(start, stop, block):
                    piece = self._rows(offset + first * row_bytes, min(block, stop - first), dtype, row_shape)
                    pieces.append(take_dims(piece, selection, first=1) if inner else piece)
            else:
                for row in range(start, stop, step):
                    piece = self._rows(offset + row * row_bytes, 1, dtype, row_shape)
                    pieces.append(take_dims(piece, selection, first=1) if inner else piece)
        if not pieces:
            empty = torch.empty((0, *row_shape), dtype=dtype)
            return take_dims(empty, selection, first=1).contiguous()
        return compact(pieces[0]) if len(pieces) == 1 else torch.cat(pieces)

    def _rows(self, offset: int, count: int, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = count * prod(row_shape) * _itemsize(dtype)
        # Uninitialised memory filled by preadv through numpy's view of it: one copy, from the page cache.
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(out.numpy())  # type: ignore[arg-type]
            fd = self._fd()
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(
                        "file ends inside a tensor",
                        source=self.display,
                        found=f"end of file after {done} of {nbytes} bytes at offset {offset}",
                        expected="the whole tensor",
                        fix="re-download or re-save the file",
                    )
                done += got
            with self._lock:
                self.stats.bytes_read += nbytes
        return out.view(dtype).view(count, *row_shape)


_ITEMSIZE: dict[torch.dtype, int] = {}


def _itemsize(dtype: torch.dtype) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        size = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size
