"""Reading a selection of a row-major tensor stored at a known file offset, with `preadv` into tensor memory.

A selection of the first dim alone reads exactly the owned rows: a contiguous run is one `preadv` straight into
the new tensor's buffer, a run with a step one `preadv` per row. When other dims are selected too (a tp rank's
columns of o_proj/down_proj, an expert's strided columns of PEFT's fused lora_B), only the byte spans of each
row that hold owned elements are read, as `ownership.selection.row_reads` plans them:

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

Every byte pulled from storage is counted in the shared `ReadStats`, and `selection_read_bytes` gives the same
count from the selection alone.

With `map_pages` (the default), whole tensors and row ranges that lie together in the file (at least `MAP_MIN_BYTES` of
them) are not copied at all: the region is mapped copy-on-write (`MAP_PRIVATE`) and its pages populated from the
page cache (`MADV_POPULATE_READ`), and each tensor is a view of its bytes there, as `safetensors` and
`torch.load(mmap=True)` hand out tensors. Populating maps pages the page cache already holds, about six times
less work than zeroing fresh memory and copying into it, and ranks on one host share those pages until one
writes. The file must then not be truncated or rewritten in place while such tensors live.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from ownership.formats.entry import ReadStats
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
import errno
import mmap
import os
import threading
from collections.abc import Sequence
from math import prod
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import torch

from ownership.errors import CheckpointError
from ownership.formats.entry import ReadStats
from ownership.formats.take import take_dims
from ownership.selection import (
    BLOCK_BYTES,
    PAGE_BYTES,
    Selection,
    Span,
    row_byte_spans,
    row_reads,
    selection_shape,
)

__all__ = [
    "MAP_MIN_BYTES",
    "PendingReads",
    "Prelude",
    "ReadRequest",
    "RowReader",
    "read_fully",
    "read_vectored",
]

ReadRequest: TypeAlias = tuple[int, torch.dtype, tuple[int, ...], Selection]
"""`(offset, dtype, shape, selection)`: a tensor's first byte in the file, its dtype and shape, what to read."""

Prelude: TypeAlias = tuple[int, bytearray]
"""`(position, buffer)`: metadata to read into `buffer` from `position` in the same pass as a tensor's bytes (a
zip record's local header, just before its data); not counted as tensor bytes."""

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
    ) -> None:
        self.map_pages = True
        """Map large whole-row reads copy-on-write instead of copying them (see the module)."""
        # The whole file, mapped copy-on-write once (one descriptor, one kernel area); tensors viewing it keep it.
        self._area: mmap.mmap | None = None
        self._area_address = 0
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
        self._area = None  # unmapped once the last tensor viewing it is gone
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
        views, regions = self._map(requests, all_spans, preludes) if self.map_pages else ({}, [])
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

    def _map(
        self,
        requests: Sequence[ReadRequest],
        all_spans: Sequence[tuple[Span, ...] | None],
        preludes: Sequence[Prelude | None] | None,
    ) -> tuple[dict[int, torch.Tensor], list[_Region]]:
        """Views over mapped regions of the file for the requests read as one run of whole rows, where such
        runs lie together (less than a page apart) in at least `MAP_MIN_BYTES`; the rest are not in the dict."""
        # (first byte, end, request): a request's bytes, from its prelude's first where it has one.
        pieces: list[tuple[int, int, int]] = []
        for i, ((offset, dtype, _, _), spans) in enumerate(zip(requests, all_spans, strict=True)):
            if spans is None or len(spans) != 1 or spans[0][1] <= spans[0][0]:
                continue
            first = offset + spans[0][0]
            if first % dtype.itemsize:
                continue  # a view must start on a multiple of its element size; this one is copied
            prelude = preludes[i] if preludes is not None else None
            if prelude is not None:
                # Mapped, the pages between a record's header and rows far into it would be populated too.
                if first - (prelude[0] + len(prelude[1])) >= self.page:
                    continue
                first = min(first, prelude[0])
            pieces.append((first, offset + spans[0][1], i))
        pieces.sort()
        groups: list[list[tuple[int, int, int]]] = []
        end = 0
        for piece in pieces:
            if groups and 0 <= piece[0] - end < self.page:
                groups[-1].append(piece)
                end = max(end, piece[1])
            else:
                groups.append([piece])
                end = piece[1]
        views: dict[int, torch.Tensor] = {}
        regions: list[_Region] = []
        for group in groups:
            if sum(last - first for first, last, _ in group) < MAP_MIN_BYTES:
                continue
            area = self._mapped(max(last for _, last, _ in group))
            if area is None:
                break
            regions.append(self._views(area, group, requests=requests, preludes=preludes, views=views))
        return views, regions

    def _mapped(self, end: int) -> mmap.mmap | None:
        """The file mapped copy-on-write through byte `end`, or None where it cannot be mapped (it is copied)."""
        if self._area is not None and end <= len(self._area):
            return self._area
        size = os.fstat(self._fd()).st_size
        if end > size:
            # A mapped page past the end of the file kills the process when touched (SIGBUS).
            raise _cut_short(
                self.display,
                found=f"end of file after {size} bytes, {end - size} bytes short of the last tensor",
            )
        try:
            area = mmap.mmap(self._fd(), size, flags=mmap.MAP_PRIVATE)
        except OSError:
            return None  # a file system that cannot map
        anchor = ctypes.c_char.from_buffer(area)
        self._area, self._area_address = area, ctypes.addressof(anchor)
        del anchor  # its export of the buffer would keep the mapping alive for good
        return area

    def _views(
        self,
        area: mmap.mmap,
        group: list[tuple[int, int, int]],
        *,
        requests: Sequence[ReadRequest],
        preludes: Sequence[Prelude | None] | None,
        views: dict[int, torch.Tensor],
    ) -> _Region:
        """A view of `area` per request of the group, and the pages of the file to populate for them."""
        start = group[0][0] - group[0][0] % mmap.PAGESIZE
        fills: list[tuple[bytearray, int]] = []
        counted = end = 0
        for _, last, i in group:
            _, dtype, shape, selection = requests[i]
            prelude = preludes[i] if preludes is not None else None
            if prelude is not None:
                fills.append((prelude[1], prelude[0]))
            local = selection_shape(selection, shape)
            length = prod(local) * dtype.itemsize
            flat = torch.frombuffer(area, dtype=dtype, count=prod(local), offset=last - length)
            views[i] = flat.view(local) if local else flat.reshape(())
            counted += length
            end = max(end, last)
        return area, self._area_address + start, end - start, fills, counted

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
        regions: list[_Region],
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
        for area, address, length, fills, nbytes in self.regions:
            _populate(address, length, area=area, display=reader.display)
            for buffer, at in fills:
                buffer[:] = area[at : at + len(buffer)]
            counted += nbytes
        for start, views, nbytes in self.stretches:
            read_vectored(fd, views, start, display=reader.display)
            counted += nbytes
        reader._count(counted)
        for tensor, offset, shape, selection in self.cuts:
            reader._read_cut(tensor, offset=offset, shape=shape, selection=selection)


MAP_MIN_BYTES = 1 << 20
"""The least bytes a region of the file must hold for its tensors to be views of the mapped file rather than
copies: below it, a copy costs about as much and does not depend on the file."""

_Region: TypeAlias = tuple[mmap.mmap, int, int, list[tuple[bytearray, int]], int]
"""`(mapping, address, length, fills, counted)`: the pages to populate, from `address` on, the prelude buffers
to fill from the mapping at their file offsets, and the tensor bytes the region holds."""

_MADV_POPULATE_READ = 22  # Linux 5.14
_madvise: Any = None


def _populate(address: int, length: int, *, area: mmap.mmap, display: str) -> None:
    """Map `length` bytes of pages from `address` from the page cache, reading from storage what is not there."""
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    # Through ctypes, which lets other threads run while the kernel works: mmap.madvise holds the interpreter.
    while _madvise(address, length, _MADV_POPULATE_READ) != 0:
        error = ctypes.get_errno()
        if error == errno.EINTR:
            continue
        if error == errno.EINVAL:  # a kernel before 5.14: touch a byte of each page instead
            anchor = ctypes.c_char.from_buffer(area)
            start = address - ctypes.addressof(anchor)
            del anchor
            for at in range(start, start + length, mmap.PAGESIZE):
                area[at]
            return
        # EFAULT: a page past the end of the file (cut short since it was mapped), which touching would turn
        # into a SIGBUS; EIO: storage failed.
        raise CheckpointError(
            "cannot read the file's pages",
            source=display,
            found=os.strerror(error),
            expected="the whole file, as long as when it was opened",
            fix="do not rewrite the file while it is read; re-download it if storage fails",
        )


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
            raise _cut_short(display, found=f"end of file after {done} of {nbytes} bytes at offset {offset}")
        done += got


def _cut_short(display: str, *, found: str) -> CheckpointError:
    """The error for a file that ends before a tensor's last byte."""
    return CheckpointError(
        "file ends inside a tensor",
        source=display,
        found=found,
        expected="the whole tensor",
        fix="re-download or re-save the file",
    )
