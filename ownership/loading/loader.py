"""Loading: a rank's plan applied to a checkpoint, reading the bytes it owns and no others.

`load(ruleset, checkpoint, mesh=..., rank=...)` plans from the checkpoint's headers and reads each owned
selection through the checkpoint's back-end, returning the tensors under their local names with totals of bytes
owned, read and skipped. The three overlap: entries are decided as the header is read (`iter_entries`); the
loading thread makes each batch of owned tensors and plans its reads (`prepare_many`), and two reader threads
read them, many per system call, while later entries are still decided.
`iter_load` yields `(local_key, tensor)` pairs one at a time, so peak memory is what the caller keeps plus the
reads in flight.

With a CUDA `device`, each owned tensor is allocated once on the device and filled through a small ring of pinned
host buffers (`ownership.loading.staging`): reading the next chunk from the file overlaps the asynchronous copy of the
last one, so device memory is the owned bytes and host staging a few MiB. Other devices get each tensor read on
the host and then moved.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({f"m.layers.0.mlp.experts.{e}.w1.lora_A.weight": torch.full((4, 8), float(e)) for e in range(4)},
    ...           f"{folder}/adapter.safetensors")
    >>> result = load("vllm-ep-lora", f"{folder}/adapter.safetensors", mesh="ep=2", rank=1,
    ...               params={"num_experts": 4})
    >>> sorted(result.tensors), result.stats.bytes_owned, result.stats.bytes_total
    (['m.layers.0.mlp.experts.2.w1.lora_A.weight', 'm.layers.0.mlp.experts.3.w1.lora_A.weight'], 256, 512)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ownership.errors import CheckpointError
from ownership.formats.base import Checkpoint, PendingRead
from ownership.formats.detect import open_checkpoint
from ownership.formats.dtypes import as_torch_dtype, torch_dtype
from ownership.gcpause import paused_gc
from ownership.loading.entries import EntryLike, entry_nbytes
from ownership.loading.plan import Plan, PlanBuilder
from ownership.loading.staging import CudaTransfer, FileRuns, Fill, StagingRing, host_fill
from ownership.placement.decision import Decision
from ownership.placement.mesh import MeshLike
from ownership.placement.selection import Selection, selection_shape
from ownership.ruleset import RulesetLike, resolve_ruleset
from ownership.spec.params import merge_configs
from ownership.units import human_bytes

__all__ = ["LoadResult", "LoadStats", "iter_load", "load"]

# Loads that own less than this finish before a progress bar would be worth drawing.
_PROGRESS_MIN_BYTES = 256 * 2**20
_READERS = 2
_PREFETCH_BYTES = 64 * 2**20
_BATCH_BYTES = 4 * 2**20


@dataclass
class LoadStats:
    """Totals of one rank's load."""

    bytes_total: int = 0
    bytes_owned: int = 0
    bytes_read: int = 0
    num_tensors: int = 0
    files_opened: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes_skipped(self) -> int:
        """Bytes of the checkpoint this rank never read."""
        return self.bytes_total - self.bytes_read


@dataclass
class LoadResult:
    """The tensors of one rank under their local names, the plan that chose them, and the totals."""

    tensors: dict[str, torch.Tensor]
    plan: Plan
    stats: LoadStats


def iter_load(
    plan: Plan,
    checkpoint: Checkpoint,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stats: LoadStats | None = None,
    progress: bool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read every owned selection of `plan` from `checkpoint`, in checkpoint order.

    `dtype` casts floating-point tensors only (integer and bool tensors keep theirs). With a CUDA `device`, each
    tensor is allocated once there and filled through pinned staging, its cast done on the device; a yielded
    tensor is ready for work queued on the current stream. Another `device` gets each tensor moved after it is
    read. `progress` draws a bar on a terminal (default: only for loads over 256 MiB). Host tensors may be
    views of the file's pages (unless the checkpoint was opened with `mmap=False`, see `load`).
    """
    stats = stats if stats is not None else LoadStats()
    stats.bytes_total = plan.bytes_total
    stats.bytes_owned = plan.bytes_owned
    bar = _progress(stats.bytes_owned, progress)
    yield from _load_pairs(
        plan.owned_entries(),
        checkpoint,
        device=device,
        dtype=dtype,
        stats=stats,
        bar=bar,
        ahead=_PREFETCH_BYTES,
    )


def _load_pairs(
    pairs: Iterator[tuple[EntryLike, Decision]],
    checkpoint: Checkpoint,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    stats: LoadStats,
    bar: _Bar | None,
    ahead: int | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read the owned `(entry, decision)` pairs as they come, at most `ahead` bytes ahead of the consumer
    (None: no bound); counts into `stats`."""
    start_read = checkpoint.stats.bytes_read
    started = time.perf_counter()
    cuda = device is not None and torch.device(device).type == "cuda"
    items = (
        _staged(pairs, checkpoint, device, dtype)
        if cuda
        else _on_host(pairs, checkpoint, device, dtype, ahead)
    )
    try:
        for entry, decision, tensor in items:
            stats.num_tensors += 1
            stats.bytes_read = checkpoint.stats.bytes_read - start_read
            if bar is not None:
                bar.advance(entry_nbytes(entry, decision) or 0)
            assert decision.local_key is not None
            yield decision.local_key, tensor
    finally:
        items.close()
        if bar is not None:
            bar.close()
        stats.seconds += time.perf_counter() - started
        stats.files_opened = sorted(checkpoint.stats.files_opened)


_Item = tuple[EntryLike, Decision, torch.Tensor]


def _on_host(
    pairs: Iterator[tuple[EntryLike, Decision]],
    checkpoint: Checkpoint,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    ahead: int | None,
) -> Generator[_Item, None, None]:
    for entry, decision, tensor in _prefetched(pairs, checkpoint, ahead=ahead):
        if dtype is not None and tensor.dtype != dtype:
            tensor = _cast(tensor, dtype, key=entry.key)
        if device is not None:
            tensor = tensor.to(device, non_blocking=True)
        yield entry, decision, tensor


def _staged(
    pairs: Iterator[tuple[EntryLike, Decision]],
    checkpoint: Checkpoint,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Generator[_Item, None, None]:
    """Owned tensors allocated once on the CUDA device and filled through a ring of pinned buffers.

    Safetensors entries (whose headers give their offsets) selected whole or by rows are read with `preadv`
    straight into the pinned buffers, on the ring's reader threads; other selections and formats are read on
    the host by the checkpoint's back-end and then go through the same buffers. A tensor is yielded once its
    copies have all been started (and the current stream told to wait for them), while later ones are read.
    """
    transfer = CudaTransfer(device)
    ring = StagingRing(transfer)
    files = _Files(checkpoint)
    try:
        for entry, decision in pairs:
            runs = files.runs(entry, decision.selection)
            fill: Fill
            if runs is None or entry.dtype is None or entry.shape is None:
                host = checkpoint.read(entry.key, decision.selection)
                fill, source_dtype, shape = host_fill(host), host.dtype, tuple(host.shape)
            else:
                source_dtype = torch_dtype(entry.dtype, key=entry.key, source=runs.display)
                fill, shape = runs, selection_shape(decision.selection, entry.shape)
            target_dtype = source_dtype
            if dtype is not None and dtype != source_dtype and source_dtype.is_floating_point:
                _check_cast(source_dtype, dtype, key=entry.key)
                target_dtype = dtype
            target = torch.empty(shape, dtype=target_dtype, device=transfer.device)
            started = ring.upload(target, fill=fill, source_dtype=source_dtype, tag=(entry, decision, target))
            yield from _started(started, transfer, files)
        yield from _started(ring.finish(), transfer, files)
    finally:
        ring.close()
        files.close()


def _started(items: list[_Item], transfer: CudaTransfer, files: _Files) -> Iterator[_Item]:
    if items:
        transfer.publish()
        files.settle()
        yield from items


class _Files:
    """Open checkpoint files for the staged path, and a selection's owned bytes as `FileRuns` of them."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._fds: dict[str, int] = {}
        # Bytes read by the reader threads, added to the checkpoint's statistics on the loading thread (whose
        # back-end counts its own reads there under a lock of its own).
        self._pending = 0
        self._lock = threading.Lock()

    def runs(self, entry: EntryLike, selection: Selection) -> FileRuns | None:
        """The owned bytes as runs of the entry's file, or None where the back-end must read them itself (a
        selection that cuts dims after the first, a record it cannot place)."""
        located = self.checkpoint.byte_runs(entry.key, selection)
        if located is None:
            return None
        path = str(located.path)
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
            self.checkpoint.stats.files_opened.add(path)
        return FileRuns(fd, runs=located.runs, display=path, on_read=self._count)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._pending += nbytes

    def settle(self) -> None:
        """Add the bytes the reader threads read to the checkpoint's statistics."""
        with self._lock:
            pending, self._pending = self._pending, 0
        self.checkpoint.stats.bytes_read += pending

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _prefetched(
    pairs: Iterator[tuple[EntryLike, Decision]], checkpoint: Checkpoint, *, ahead: int | None
) -> Iterator[tuple[EntryLike, Decision, torch.Tensor]]:
    """Owned tensors in plan order, read by two threads ahead of the consumer.

    Small tensors go in batches of about `_BATCH_BYTES`. This thread makes each batch's tensors and plans its
    reads (`prepare_many`); a reader thread only reads, with the interpreter lock released, so the reads overlap
    the Python work of this thread and of whoever produces `pairs` (a plan still being decided). At most `ahead`
    bytes are read before the consumer takes them, which bounds memory for a consumer that drops tensors; one
    that keeps them all (`load`) passes None, so that deciding the rest of the plan never waits for reads.
    """
    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="ownership-read") as pool:
        pending: deque[tuple[int, _Batch, PendingRead, Future[None]]] = deque()
        queued = 0
        batch: _Batch = []
        size = 0

        def submit() -> None:
            nonlocal queued
            prepared = checkpoint.prepare_many([(entry.key, decision.selection) for entry, decision in batch])
            pending.append((size, batch, prepared, pool.submit(prepared.run)))
            queued += size

        def handed() -> Iterator[tuple[EntryLike, Decision, torch.Tensor]]:
            nonlocal queued
            done, items, prepared, future = pending.popleft()
            queued -= done
            future.result()
            for (entry, decision), tensor in zip(items, prepared.result(), strict=True):
                yield entry, decision, tensor

        try:
            for entry, decision in pairs:
                batch.append((entry, decision))
                size += entry_nbytes(entry, decision) or 0
                if size < _BATCH_BYTES:
                    continue
                submit()
                batch, size = [], 0
                # Hand over what is read; wait only when too far ahead.
                while pending and ((ahead is not None and queued >= ahead) or pending[0][3].done()):
                    yield from handed()
            if batch:
                submit()
            while pending:
                yield from handed()
        finally:
            for *_, future in pending:
                future.cancel()


_Batch = list[tuple[EntryLike, Decision]]


def _cast(tensor: torch.Tensor, dtype: torch.dtype, *, key: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    _check_cast(tensor.dtype, dtype, key=key)
    return tensor.to(dtype)


def _check_cast(source: torch.dtype, dtype: torch.dtype, *, key: str) -> None:
    if not dtype.is_floating_point:
        raise CheckpointError(
            f"cannot cast a {source} tensor to {dtype}",
            key=key,
            found=str(source),
            expected="a floating-point target dtype",
            fix="pass a floating-point dtype such as torch.bfloat16, or none",
        )


def load(
    ruleset: RulesetLike,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    mesh: MeshLike,
    rank: int,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool | None = None,
    mmap: bool = True,
    force_config: bool = False,
) -> LoadResult:
    """Plan `rank`'s share of `checkpoint` from its headers and read exactly that.

    `ruleset` is a `Ruleset`, a built-in name, a `model_type`, a rule file or `"auto"` (the built-in for the
    checkpoint's `model_type`); `checkpoint` a path (file or folder) or a checkpoint already open
    (`open_checkpoint`, left open: it reads as it was opened, whatever `mmap` says). `dtype` is a torch dtype or
    its name (`"bfloat16"`, `"bf16"`, `"torch.float16"`). The tensors fit `model.load_state_dict` as they are:
    `model.load_state_dict(ownership.load("auto", path, mesh="ep=8", rank=3).tensors)`. Params not given are
    read from the checkpoint's `config.json` where the ruleset names the config keys, with `config` (for an
    adapter, its base model's config.json) laid over it; a `config` of another `model_type` than the
    checkpoint's is an error unless `force_config`. With `mmap` (the default), large
    tensors kept whole or by rows are copy-on-write views of the file's pages, mapped and populated, as
    safetensors and `torch.load(mmap=True)` give them: the file must not be truncated or rewritten in place while
    they live. `mmap=False` reads every tensor into memory of its own.
    """
    dtype = as_torch_dtype(dtype)
    opened = (
        nullcontext(checkpoint)
        if isinstance(checkpoint, Checkpoint)
        else open_checkpoint(checkpoint, mmap=mmap)
    )
    # One pause of the cyclic collector for the whole load: the header's objects are collected once, after.
    with paused_gc(), opened as source:
        merged = merge_configs(source.config, config, force=force_config)
        bound = resolve_ruleset(ruleset, merged, source=str(checkpoint)).bind(
            mesh=mesh, params=params, config=merged
        )
        builder = PlanBuilder(bound, source.iter_entries(), rank=rank)
        stats = LoadStats()
        finished: list[Plan] = []

        def decided(plan: Plan) -> None:
            stats.bytes_total, stats.bytes_owned = plan.bytes_total, plan.bytes_owned
            finished.append(plan)

        def streamed() -> Iterator[tuple[EntryLike, Decision]]:
            # Reading starts with the first owned key while the rest are still being decided; the finished plan
            # is checked and totalled while the last reads complete.
            yield from builder.owned_entries()
            decided(builder.plan())

        pairs: Iterator[tuple[EntryLike, Decision]]
        bar = None
        if progress or (progress is None and sys.stderr.isatty()):
            # A progress bar may be drawn, and it needs the total first.
            decided(builder.plan())
            pairs, bar = finished[0].owned_entries(), _progress(stats.bytes_owned, progress)
        else:
            pairs = streamed()
        tensors = dict(
            _load_pairs(pairs, source, device=device, dtype=dtype, stats=stats, bar=bar, ahead=None)
        )
        plan = finished[0]
    return LoadResult(tensors=tensors, plan=plan, stats=stats)


class _Bar:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn
        from rich.text import Text

        class Speed(ProgressColumn):  # rich's own speed column counts in decimal units
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("?" if speed is None else f"{human_bytes(speed)}/s", style="progress.data.speed")

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            Speed(),
            transient=True,
        )
        self._task = self._progress.add_task("loading", total=total)
        self._progress.start()

    def advance(self, num_bytes: int) -> None:
        self._progress.advance(self._task, num_bytes)

    def close(self) -> None:
        self._progress.stop()


def _wants_progress(wanted: bool | None, total: int) -> bool:
    if wanted is None:
        return sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES
    return wanted


def _progress(total: int, wanted: bool | None) -> _Bar | None:
    return _Bar(total) if _wants_progress(wanted, total) else None
