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
from ownership.formats.take import take_dims
from ownership.selection import Run, Selection, selection_shape

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
        self._local = threading.local()

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

    def peek(self, offset: int, size: int) -> bytes:
        """A few bytes of metadata (not tensor data: not counted in `bytes_read`)."""
        return os.pread(self._fd(), size, offset)

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
        # The result is allocated once; owned rows land in it directly, or through a reused staging block
        # when a run has a step or other dims are selected.
        out = torch.empty(selection_shape(selection, shape), dtype=dtype)
        whole: tuple[Run, ...] = ((0, shape[0], 1),)
        position = 0
        for start, stop, step in whole if rows is None else rows:
            if step == 1 and not inner:
                count = stop - start
                self._fill(out[position : position + count], offset + start * row_bytes)
                position += count
                continue
            block = max(1, _BLOCK_BYTES // max(row_bytes, 1)) if step == 1 else 1
            for first in range(start, stop, step * block):
                count = min(block, len(range(first, stop, step)))
                staged = self._staged(offset + first * row_bytes, count, dtype, row_shape)
                part = take_dims(staged, selection, first=1) if inner else staged
                out[position : position + count].copy_(part)
                position += count
        return out

    def _fill(self, target: torch.Tensor, offset: int) -> None:
        """preadv straight into a contiguous tensor's memory."""
        nbytes = target.numel() * target.element_size()
        if nbytes:
            self._pread(memoryview(target.view(torch.uint8).reshape(-1).numpy()), offset)  # type: ignore[arg-type]

    def _staged(
        self, offset: int, count: int, dtype: torch.dtype, row_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Rows read into this thread's staging buffer, valid until its next read."""
        nbytes = count * prod(row_shape) * _itemsize(dtype)
        buffer: torch.Tensor | None = getattr(self._local, "staging", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.staging = torch.empty(max(nbytes, _BLOCK_BYTES), dtype=torch.uint8)
        view = buffer[:nbytes]
        if nbytes:
            self._pread(memoryview(view.numpy()), offset)  # type: ignore[arg-type]
        return view.view(dtype).view(count, *row_shape)

    def _pread(self, view: memoryview, offset: int) -> None:
        nbytes = len(view)
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

    def _rows(self, offset: int, count: int, dtype: torch.dtype, row_shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty((count, *row_shape), dtype=dtype)
        self._fill(out, offset)
        return out


_ITEMSIZE: dict[torch.dtype, int] = {}


def _itemsize(dtype: torch.dtype) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        size = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size
