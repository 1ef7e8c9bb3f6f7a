"""Tensors as copy-on-write views of a file's pages, mapped once and populated from the page cache.

Whole tensors and row ranges that lie together in a file (at least `MAP_MIN_BYTES` of them, less than a page
apart) are not copied: the file is mapped copy-on-write (`MAP_PRIVATE`) once per reader, the region's pages are
populated (`MADV_POPULATE_READ`, through ctypes so that other threads run meanwhile), and each tensor is a
`torch.frombuffer` view of its bytes with a storage of its own, as `safetensors` and `torch.load(mmap=True)` hand
out tensors. Populating maps pages the page cache already holds, about six times less work than zeroing fresh
memory and copying into it, and ranks on one host share those pages until one writes. The file must then not
be truncated or rewritten in place while such tensors live.

A region past the end of the file is the pinned "file ends inside a tensor" error (a mapped page past the end
kills the process when touched); a populate that fails is handled by its errno (an old kernel: pages touched
instead; EFAULT, EIO: a `CheckpointError`).

Example:
    >>> import os, tempfile, torch
    >>> path = tempfile.mkdtemp() + "/raw"
    >>> _ = open(path, "wb").write(torch.arange(2**19, dtype=torch.int32).numpy().tobytes())  # 2 MiB
    >>> fd = os.open(path, os.O_RDONLY)
    >>> mapping = FileMapping(lambda: fd, display="raw", page=4096)
    >>> views, regions = mapping.map([(0, torch.int32, (2**19,), None)], [((0, 2**21),)], None)
    >>> for region in regions: region.populate(display="raw")
    >>> int(views[0][-1]), regions[0].counted
    (524287, 2097152)
    >>> del views, regions; mapping.close(); os.close(fd)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Sequence
from math import prod
from typing import Any, NamedTuple, TypeAlias

import torch

from ownership.errors import CheckpointError
from ownership.formats.spans import Span
from ownership.placement.selection import Selection, selection_shape

__all__ = ["MAP_MIN_BYTES", "FileMapping", "Prelude", "ReadRequest", "Region", "cut_short"]

MAP_MIN_BYTES = 1 << 20
"""The least bytes a region of the file must hold for its tensors to be views of the mapped file rather than
copies: below it, a copy costs about as much and does not depend on the file."""

ReadRequest: TypeAlias = tuple[int, torch.dtype, tuple[int, ...], Selection]
"""`(offset, dtype, shape, selection)`: a tensor's first byte in the file, its dtype and shape, what to read."""

Prelude: TypeAlias = tuple[int, bytearray]
"""`(position, buffer)`: metadata to read into `buffer` from `position` in the same pass as a tensor's bytes (a
zip record's local header, just before its data); not counted as tensor bytes."""


class Region(NamedTuple):
    """Pages of the mapped file to populate for the views of one group of requests: `length` bytes from
    `address`; `fills` are prelude buffers to fill from the mapping at their file offsets, and `counted` the
    tensor bytes the region holds."""

    area: mmap.mmap
    address: int
    length: int
    fills: list[tuple[bytearray, int]]
    counted: int

    def populate(self, *, display: str) -> None:
        """Map the region's pages from the page cache (reading from storage what is not there), then fill the
        preludes; safe on any thread."""
        _populate(self.address, self.length, area=self.area, display=display)
        for buffer, at in self.fills:
            buffer[:] = self.area[at : at + len(buffer)]


class FileMapping:
    """One file mapped copy-on-write once (one descriptor, one kernel area), and views of it.

    `fd()` gives the open file's descriptor; `page` is the gap below which requests' bytes are one region.
    Tensors viewing the mapping keep it alive after `close`.
    """

    def __init__(self, fd: Callable[[], int], *, display: str, page: int) -> None:
        self._fd = fd
        self.display = display
        self.page = page
        self._area: mmap.mmap | None = None
        self._address = 0

    def close(self) -> None:
        self._area = None  # unmapped once the last tensor viewing it is gone

    def map(
        self,
        requests: Sequence[ReadRequest],
        all_spans: Sequence[tuple[Span, ...] | None],
        preludes: Sequence[Prelude | None] | None,
    ) -> tuple[dict[int, torch.Tensor], list[Region]]:
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
        regions: list[Region] = []
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
        fd = self._fd()
        size = os.fstat(fd).st_size
        if end > size:
            # A mapped page past the end of the file kills the process when touched (SIGBUS).
            raise cut_short(
                self.display,
                found=f"end of file after {size} bytes, {end - size} bytes short of the last tensor",
            )
        try:
            area = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
        except OSError:
            return None  # a file system that cannot map
        anchor = ctypes.c_char.from_buffer(area)
        self._area, self._address = area, ctypes.addressof(anchor)
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
    ) -> Region:
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
        return Region(area, self._address + start, end - start, fills, counted)


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


def cut_short(display: str, *, found: str) -> CheckpointError:
    """The error for a file that ends before a tensor's last byte."""
    return CheckpointError(
        "file ends inside a tensor",
        source=display,
        found=found,
        expected="the whole tensor",
        fix="re-download or re-save the file",
    )
