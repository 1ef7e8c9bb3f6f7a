"""Reading a selection of a row-major tensor stored at a known file offset, with `preadv` into tensor memory.

A selection of the first dim alone reads exactly the owned rows: a contiguous run is one `preadv` straight into
the new tensor's buffer, a run with a step one `preadv` per row. When other dims are selected too (a tp rank's
columns of o_proj/down_proj, an expert's strided columns of PEFT's fused lora_B), only the byte spans of each
row that hold owned elements are read, as `ownership.formats.spans.row_reads` plans them:

- a row's owned bytes are merged into spans wherever two are less than a page (4 KiB) apart: storage reads
  whole pages, so a gap shorter than a page holds no page that could be skipped, and reading it saves a read
  call; a strided selection over a short row (columns `0:24:6`) is one span. Consecutive rows' spans are merged
  the same way, and consecutive rows shorter than two pages are read as one block (from the first owned byte
  to the last), as a read call per row would skip at most a page. Rows that a strided run of the first dim
  skips are never read, so the selected rows whole bound what is read;
- where a row's owned elements are one span in stored order (a column range) and rows are not merged, each
  row's span is one `preadv` straight into the result: `[64, 8192]` float32 keeping columns `0:1024` reads 64 spans of 4 KiB, 262,144
  bytes, where whole rows would be 2,097,152;
- other rows are staged at most 4 MiB at a time (a thread's staging buffer, reused) and the owned elements
  copied out; rows over 4 MiB are read the same way one dim down, so no staging exceeds 4 MiB.

Every byte pulled from storage is counted in the shared `ReadStats`, and `selection_read_bytes`
(`ownership.formats.spans`) gives the same count from the selection alone. With `map_pages` (the default), large
whole-row reads are views of the mapped file instead (`ownership.formats.mapped`).

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from ownership.formats.base import ReadStats
    >>> path = Path(tempfile.mkdtemp()) / "raw"
    >>> _ = path.write_bytes(torch.arange(12, dtype=torch.int32).numpy().tobytes())
    >>> reader = RowReader(path, stats=ReadStats(), display="raw")
    >>> reader.read(0, torch.int32, (4, 3), (((1, 4, 2),), ((0, 1, 1),))).tolist()
    [[3], [9]]
    >>> reader.stats.bytes_read
    8
    >>> reader.close()
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from math import prod
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, TypeAlias

import torch

from ownership.formats.base import ReadStats
from ownership.formats.mapped import FileMapping, Prelude, ReadRequest, Region, cut_short
from ownership.formats.spans import BLOCK_BYTES, PAGE_BYTES, Span, row_byte_spans, row_reads
from ownership.formats.take import take_dims
from ownership.placement.selection import Selection, selection_shape

__all__ = [
    "PendingReads",
    "Prelude",
    "ReadRequest",
    "RowReader",
    "read_fully",
    "read_vectored",
]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class RowReader:
    """Reads row-major tensors out of one file; opens it on the first read.

    `page` and `block` are the gap below which owned spans are read together and the staging bound (see
    `ownership.selection.row_reads`).
    """

    def __init__(
        self,
        path: Path,
        *,
        stats: ReadStats,
        display: str,
        page: int = PAGE_BYTES,
        block: int = BLOCK_BYTES,
        map_pages: bool = True,
    ) -> None:
        self.map_pages = map_pages
        """Map large whole-row reads copy-on-write instead of copying them (`ownership.formats.mapped`)."""
        self._mapping = FileMapping(self._fd, display=display, page=page)
        self.path = path
        self.stats = stats
        self.display = display
        self.page = page
        self.block = block
        self._handle: BinaryIO | None = None
        # Readers may run on several threads: opening the file and the byte count are shared, staging is not.
        self._lock = threading.Lock()
        self._local = threading.local()

    def close(self) -> None:
        self._mapping.close()
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
        return self.read_many([(offset, dtype, shape, selection)])[0]

    def read_many(
        self, requests: Sequence[ReadRequest], *, preludes: Sequence[Prelude | None] | None = None
    ) -> list[torch.Tensor]:
        """`read` of each `(offset, dtype, shape, selection)` (`prepare`, then its reads)."""
        pending = self.prepare(requests, preludes=preludes)
        pending.run()
        return pending.tensors

    def prepare(
        self, requests: Sequence[ReadRequest], *, preludes: Sequence[Prelude | None] | None = None
    ) -> PendingReads:
        """Allocate the results of `read_many` and plan their reads, to `run` later, on any thread.

        Owned bytes that lie back to back in the file, across tensors (an expert's keys, say), are one `preadv`.
        `preludes[i]`, where given, is read in the same pass, just before request i.
        """
        runs: list[tuple[int, memoryview, bool]] = []
        cuts: list[tuple[torch.Tensor, int, tuple[int, ...], Selection]] = []
        out: list[torch.Tensor] = []
        all_spans = [
            row_byte_spans(selection, shape=shape, itemsize=dtype.itemsize)
            for _, dtype, shape, selection in requests
        ]
        views, regions = self._mapping.map(requests, all_spans, preludes) if self.map_pages else ({}, [])
        for i, (offset, dtype, shape, selection) in enumerate(requests):
            if i in views:
                out.append(views[i])
                continue
            prelude = preludes[i] if preludes is not None else None
            if prelude is not None:
                runs.append((prelude[0], memoryview(prelude[1]), False))
            # Each result is allocated once (a scalar as one element: its bytes cannot be viewed as a 0-dim
            # tensor); owned bytes land in it directly, or through the reading thread's staging.
            tensor = torch.empty(selection_shape(selection, shape) or (1,), dtype=dtype)
            spans = all_spans[i]
            if spans is None:
                cuts.append((tensor, offset, shape, selection))
            else:
                # Whole tensors and rows of the first dim (most keys of most loads): no plan needed.
                view, position = _bytes_of(tensor), 0
                for lo, hi in spans:
                    runs.append((offset + lo, view[position : position + hi - lo], True))
                    position += hi - lo
            out.append(tensor if shape else tensor.reshape(()))
        # In file order, so that runs a request order would interleave (zip records) are read together.
        runs.sort(key=itemgetter(0))
        return PendingReads(self, requests, out, _stretches(runs), cuts, regions)

    def _read_cut(
        self, out: torch.Tensor, *, offset: int, shape: tuple[int, ...], selection: Selection
    ) -> None:
        """Fill `out` with a selection that cuts dims after the first, span by span (`row_reads`)."""
        dtype, itemsize = out.dtype, out.element_size()
        for step in row_reads(selection, shape=shape, itemsize=itemsize, page=self.page, block=self.block):
            level = out
            for index in step.at:
                level = level[index]
            target = level[step.rows[0] : step.rows[1]]
            if step.copy_from is not None:
                target.copy_(level[step.copy_from : step.copy_from + 1])
            elif step.staged is None:
                self._count(
                    self._spans(_bytes_of(target), offset=offset + step.offset, spans=step.spans, packed=True)
                )
            else:
                window, within = step.staged
                staging = self._staging(prod(window) * itemsize)
                view = memoryview(staging.numpy())  # type: ignore[arg-type]
                self._count(self._spans(view, offset=offset + step.offset, spans=step.spans, packed=False))
                target.copy_(take_dims(staging.view(dtype).view(window), within))

    def _staging(self, nbytes: int) -> torch.Tensor:
        """The first `nbytes` of this thread's staging buffer, valid until its next read."""
        buffer: torch.Tensor | None = getattr(self._local, "staging", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._local.staging = torch.empty(max(nbytes, self.block), dtype=torch.uint8)
        return buffer[:nbytes]

    def _spans(self, view: memoryview, *, offset: int, spans: tuple[Span, ...], packed: bool) -> int:
        """Read each span `[lo, hi)` after `offset` into `view`: back to back if `packed`, else at `lo`."""
        fd, preadv = self._fd(), os.preadv
        position = 0
        for lo, hi in spans:
            size = hi - lo
            at = position if packed else lo
            part = view[at : at + size]
            got = preadv(fd, [part], offset + lo)
            if got != size:
                self._pread(part, fd=fd, offset=offset + lo, done=got)
            position += size
        return position

    def _pread(self, view: memoryview, *, fd: int, offset: int, done: int = 0) -> None:
        read_fully(fd, view, offset, display=self.display, done=done)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.stats.bytes_read += nbytes


class PendingReads:
    """Tensors allocated by `RowReader.prepare`, and the reads that fill them (`run`).

    `prepare` makes every tensor of whole rows (or views them in the mapped file); for those `run` only reads,
    a `preadv` per stretch of the file or a populate per mapped region, so a thread that runs it waits for the
    interpreter lock a few times per batch. That matters: a thread that gives the lock up (as every torch call
    does) and takes it back while another thread runs Python waits up to the switch interval (5 ms) each time.
    Selections that cut later dims are still copied out of staging, with torch, in `run`.
    """

    def __init__(
        self,
        reader: RowReader,
        requests: Sequence[ReadRequest],
        tensors: list[torch.Tensor],
        stretches: list[_Stretch],
        cuts: list[tuple[torch.Tensor, int, tuple[int, ...], Selection]],
        regions: list[Region],
    ) -> None:
        self.regions = regions
        self.reader = reader
        self.requests = requests
        self.tensors = tensors
        self.stretches = stretches
        self.cuts = cuts

    def run(self) -> None:
        """Read every tensor's bytes; safe on any thread, once."""
        reader = self.reader
        fd, counted = reader._fd(), 0
        for region in self.regions:
            region.populate(display=reader.display)
            counted += region.counted
        for start, views, nbytes in self.stretches:
            read_vectored(fd, views, start, display=reader.display)
            counted += nbytes
        reader._count(counted)
        for tensor, offset, shape, selection in self.cuts:
            reader._read_cut(tensor, offset=offset, shape=shape, selection=selection)


_Stretch: TypeAlias = tuple[int, list[memoryview], int]
"""`(offset, views, counted)`: consecutive bytes of the file from `offset` into `views`, one `preadv`; `counted`
of them are tensor bytes (the rest is metadata read along, a zip record's header)."""


def _stretches(runs: Sequence[tuple[int, memoryview, bool]]) -> list[_Stretch]:
    """Runs `(offset, view, counted)` in file order, joined where one starts at the previous one's end."""
    out: list[_Stretch] = []
    views: list[memoryview] = []
    start = end = counted = 0
    for offset, view, is_data in runs:
        if not (views and offset == end and len(views) < _IOV_MAX):
            if views:
                out.append((start, views, counted))
            views, start, end, counted = [], offset, offset, 0
        views.append(view)
        end += len(view)
        if is_data:
            counted += len(view)
    if views:
        out.append((start, views, counted))
    return out


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, as bytes, valid while the tensor lives."""
    # Through ctypes: a third of the cost of a uint8 view's numpy array, paid per tensor read.
    return memoryview(
        (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    )


def read_vectored(fd: int, views: Sequence[memoryview], offset: int, *, display: str) -> None:
    """Fill `views` from consecutive bytes of the file starting at `offset`; one `preadv` unless it comes back
    short (a signal, a huge read), when the rest is read view by view."""
    got = os.preadv(fd, views, offset)
    for view in views:
        size = len(view)
        if got < size:
            read_fully(fd, view, offset, display=display, done=max(got, 0))
        got -= size
        offset += size


def read_fully(fd: int, view: memoryview, offset: int, *, display: str, done: int = 0) -> None:
    """Fill `view` from the file at `offset` (its first `done` bytes already read); a short file is a
    `CheckpointError` naming `display`."""
    nbytes = len(view)
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise cut_short(display, found=f"end of file after {done} of {nbytes} bytes at offset {offset}")
        done += got
