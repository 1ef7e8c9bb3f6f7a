"""Loading onto a CUDA device through pinned host staging: reading the next chunks overlaps copying the last.

A `StagingRing` holds a few pinned host buffers of a few MiB. Tensors already allocated on the device are
queued with `upload(target, fill=..., source_dtype=...)` and go through the buffers chunk by chunk: take the next
buffer, wait for its last copy to finish (a CUDA event), have a reader thread `fill` it with the next bytes (a
`preadv` straight from the checkpoint file, or a copy from a host tensor), and once filled start
`target_chunk.copy_(buffer, non_blocking=True)` on a copy stream and record the buffer's event. Two threads read
while the copy engine moves what was read before, across tensor boundaries; a tensor of any size goes through
the same few buffers, so host staging stays `num_buffers * buffer_bytes` and device memory is the targets alone
(a cast to another dtype runs on the device, per chunk).

`Transfer` is the device side (buffers, copies, fences); `CudaTransfer` is the real one, and tests drive the ring
with a fake whose copies happen late, so that reusing a buffer before its fence would show.

Example (a fake device whose copies are synchronous):
    >>> import torch
    >>> class Now:
    ...     def host_buffer(self, nbytes): return torch.empty(nbytes, dtype=torch.uint8)
    ...     def copy(self, target, source): target.copy_(source); return self
    ...     def wait(self): pass
    >>> ring = StagingRing(Now(), num_buffers=3, buffer_bytes=64)
    >>> source = torch.arange(40, dtype=torch.float32)
    >>> target = torch.empty(40, dtype=torch.float64)
    >>> started = ring.upload(target, fill=host_fill(source), source_dtype=torch.float32, tag="a")
    >>> started + ring.finish(), ring.num_copies
    (['a'], 3)
    >>> ring.close(); torch.equal(target, source.double())
    True
"""

from __future__ import annotations

import bisect
import ctypes
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from ownership.formats.pread import read_fully

__all__ = [
    "BUFFER_BYTES",
    "NUM_BUFFERS",
    "NUM_READERS",
    "CudaTransfer",
    "Fence",
    "FileRuns",
    "Fill",
    "StagingRing",
    "Transfer",
    "host_fill",
]

NUM_BUFFERS = 4
# Threads reading into buffers at once: reads of page-cached files are memory copies, and two overlap well.
NUM_READERS = 2
# A multiple of every dtype's size, so that chunks hold whole elements; large enough that the per-chunk Python
# and copy-launch costs are small next to reading the chunk, small enough that staging is negligible.
BUFFER_BYTES = 8 * 2**20

Fill = Callable[[torch.Tensor, int], None]
"""`fill(buffer, start)` writes bytes `start .. start + buffer.numel()` of a tensor's owned bytes into `buffer`
(a 1-D uint8 tensor in host memory)."""


class Fence(Protocol):
    """Completion of one asynchronous copy."""

    def wait(self) -> None: ...


class Transfer(Protocol):
    """The device side of a `StagingRing`."""

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 host buffer the device can copy from asynchronously (pinned, for CUDA)."""
        ...

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> Fence:
        """Start copying host `source` into device `target` (same numel; the dtypes may differ)."""
        ...


class StagingRing:
    """`num_buffers` host buffers of `buffer_bytes`, filled by `num_readers` threads and copied in order.

    Chunks of every tensor given to `upload` go through the buffers in turn. Up to `num_readers` buffers are
    being filled at once (reads release the GIL, so they overlap one another and the copies); the oldest filled
    buffer's copy is started as soon as its fill is done, and a buffer is refilled only after its last copy
    finished. `upload` and `finish` return the tags of the tensors whose copies have all been started, in the
    order they were given.
    """

    def __init__(
        self,
        transfer: Transfer,
        *,
        num_buffers: int = NUM_BUFFERS,
        buffer_bytes: int = BUFFER_BYTES,
        num_readers: int = NUM_READERS,
    ) -> None:
        if num_buffers < 1 or buffer_bytes < 16 or buffer_bytes % 16:
            raise ValueError("a staging ring needs at least one buffer of a positive multiple of 16 bytes")
        # A buffer is refilled only once its chunk's copy has started: fewer fills in flight than buffers.
        num_readers = max(1, min(num_readers, num_buffers - 1))
        self.transfer = transfer
        self.buffer_bytes = buffer_bytes
        self.num_readers = num_readers
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._fences: list[Fence | None] = [None] * num_buffers
        self._next = 0
        self._pool = (
            ThreadPoolExecutor(max_workers=num_readers, thread_name_prefix="ownership-stage")
            if num_readers > 1
            else None
        )
        # Chunks being filled, oldest first: (fill result, device chunk, staged host chunk, slot, its tensor).
        self._filling: deque[tuple[Future[None], torch.Tensor, torch.Tensor, int, _Open]] = deque()
        # Tensors whose copies are not all started, in upload order.
        self._open: deque[_Open] = deque()
        self.num_copies = 0

    def upload(
        self, target: torch.Tensor, *, fill: Fill, source_dtype: torch.dtype, tag: Any = None
    ) -> list[Any]:
        """Queue the contiguous device tensor `target` to be filled with the bytes `fill` gives, read as
        `source_dtype`; returns the tags of the tensors (this one or earlier) whose copies have all started."""
        if not target.is_contiguous():
            raise ValueError("staging fills contiguous tensors only")
        flat = target.view(-1)
        itemsize = source_dtype.itemsize
        per_chunk = self.buffer_bytes // itemsize
        firsts = range(0, flat.numel(), per_chunk)
        tensor = _Open(tag, len(firsts))
        self._open.append(tensor)
        for first in firsts:
            count = min(per_chunk, flat.numel() - first)
            slot = self._next
            self._next = (slot + 1) % len(self._buffers)
            fence = self._fences[slot]
            if fence is not None:
                fence.wait()
                self._fences[slot] = None
            staged = self._buffer(slot)[: count * itemsize]
            self._filling.append(
                (
                    self._fill(fill, staged, first * itemsize),
                    flat[first : first + count],
                    staged.view(source_dtype),
                    slot,
                    tensor,
                )
            )
            while len(self._filling) >= self.num_readers:
                self._start_copy()
        return self._finished()

    def finish(self) -> list[Any]:
        """Start every queued copy; returns the tags not returned yet."""
        while self._filling:
            self._start_copy()
        return self._finished()

    def close(self) -> None:
        """Wait for every fill and copy in flight (after an error too); the buffers can then be freed."""
        try:
            for future, *_ in self._filling:
                future.cancel()
                if not future.cancelled():
                    future.exception()
            self._filling.clear()
            for slot, fence in enumerate(self._fences):
                if fence is not None:
                    fence.wait()
                    self._fences[slot] = None
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _buffer(self, slot: int) -> torch.Tensor:
        buffer = self._buffers[slot]
        if buffer is None:
            # One allocation for every buffer: pinning memory costs about as much per call as per MiB.
            size = self.buffer_bytes
            whole = self.transfer.host_buffer(size * len(self._buffers))
            self._buffers = [whole[i * size : (i + 1) * size] for i in range(len(self._buffers))]
            buffer = self._buffers[slot]
            assert buffer is not None
        return buffer

    def _fill(self, fill: Fill, staged: torch.Tensor, start: int) -> Future[None]:
        if self._pool is not None:
            return self._pool.submit(fill, staged, start)
        done: Future[None] = Future()
        fill(staged, start)
        done.set_result(None)
        return done

    def _start_copy(self) -> None:
        future, chunk, staged, slot, tensor = self._filling.popleft()
        future.result()
        self._fences[slot] = self.transfer.copy(chunk, staged)
        self.num_copies += 1
        tensor.chunks_left -= 1

    def _finished(self) -> list[Any]:
        done = []
        while self._open and self._open[0].chunks_left == 0:
            done.append(self._open.popleft().tag)
        return done


class _Open:
    __slots__ = ("chunks_left", "tag")

    def __init__(self, tag: Any, chunks_left: int) -> None:
        self.tag = tag
        self.chunks_left = chunks_left


class _CudaFence:
    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


class CudaTransfer:
    """Copies from pinned host buffers to one CUDA device on a stream of their own.

    Call `publish()` before handing out a tensor it filled: the caller's current stream then waits for the
    copies so far (on the device, without blocking the host).
    """

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        device = torch.device("cuda") if device is None else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CudaTransfer needs a CUDA device, not {device}")
        self.device = torch.device(
            "cuda", torch.cuda.current_device() if device.index is None else device.index
        )
        self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._last_target = 0

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> _CudaFence:
        storage = target.untyped_storage().data_ptr()
        if storage != self._last_target:
            # A new target was allocated on the caller's stream: the copy stream must not write it before that.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._last_target = storage
        with torch.cuda.stream(self.stream):
            # A dtype change makes torch copy into a chunk-sized device temporary and cast there.
            target.copy_(source, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self.stream)
        return _CudaFence(event)

    def publish(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def host_fill(tensor: torch.Tensor) -> Fill:
    """A `Fill` over the bytes of a host tensor (made contiguous)."""
    data = tensor.detach().contiguous().view(-1).view(torch.uint8)

    def fill(buffer: torch.Tensor, start: int) -> None:
        buffer.copy_(data[start : start + buffer.numel()])

    return fill


class FileRuns:
    """A tensor's owned bytes as byte runs `(offset, length)` of one open file, read with `preadv`.

    `on_read(nbytes)` is told every byte count read (the checkpoint's statistics).
    """

    def __init__(
        self, fd: int, *, runs: Sequence[tuple[int, int]], display: str, on_read: Callable[[int], None]
    ) -> None:
        self.fd = fd
        self.runs = list(runs)
        self.display = display
        self.on_read = on_read
        self._starts: list[int] = []
        total = 0
        for _, length in self.runs:
            self._starts.append(total)
            total += length
        self.nbytes = total

    def __call__(self, buffer: torch.Tensor, start: int) -> None:
        size = buffer.numel()
        if size == 0:
            return
        view = memoryview((ctypes.c_char * size).from_address(buffer.data_ptr())).cast("B")
        index = bisect.bisect_right(self._starts, start) - 1
        done = 0
        while done < size:
            offset, length = self.runs[index]
            within = start + done - self._starts[index]
            take = min(length - within, size - done)
            self._pread(view[done : done + take], offset + within)
            done += take
            index += 1
        self.on_read(size)

    def _pread(self, view: memoryview, offset: int) -> None:
        read_fully(self.fd, view, offset, display=self.display)
