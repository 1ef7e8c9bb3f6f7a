"""Loading: a rank's plan applied to a checkpoint, reading the bytes it owns and no others.

`load(ruleset, checkpoint, mesh=..., rank=...)` plans from the checkpoint's headers, then reads each owned
selection through the checkpoint's back-end and returns the tensors under their local names, with totals of
bytes owned, read and skipped. `iter_load` yields `(local_key, tensor)` pairs one at a time, so peak memory is
what the caller keeps plus one tensor in flight.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from ownership import load_ruleset
    >>> folder = tempfile.mkdtemp()
    >>> save_file({f"m.layers.0.mlp.experts.{e}.w1.lora_A.weight": torch.full((4, 8), float(e)) for e in range(4)},
    ...           f"{folder}/adapter.safetensors")
    >>> result = load(load_ruleset("vllm-ep-lora"), f"{folder}/adapter.safetensors", mesh="ep=2", rank=1,
    ...               params={"num_experts": 4})
    >>> sorted(result.tensors), result.stats.bytes_owned, result.stats.bytes_total
    (['m.layers.0.mlp.experts.2.w1.lora_A.weight', 'm.layers.0.mlp.experts.3.w1.lora_A.weight'], 256, 512)
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ownership.decision import Decision
from ownership.errors import CheckpointError
from ownership.formats import Checkpoint, open_checkpoint
from ownership.plan import EntryLike, Plan, build_plan, entry_nbytes
from ownership.ruleset import MeshLike, Ruleset

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

    `dtype` casts floating-point tensors only (integer and bool tensors keep theirs); `device` moves each
    tensor as it is read. `progress` draws a bar on a terminal (default: only for loads over 256 MiB).
    """
    stats = stats if stats is not None else LoadStats()
    stats.bytes_total = plan.bytes_total
    stats.bytes_owned = plan.bytes_owned
    start_read = checkpoint.stats.bytes_read
    started = time.perf_counter()
    bar = _progress(stats.bytes_owned, progress)
    try:
        for entry, decision, tensor in _prefetched(plan, checkpoint):
            if dtype is not None and tensor.dtype != dtype:
                tensor = _cast(tensor, dtype, key=entry.key)
            if device is not None:
                tensor = tensor.to(device, non_blocking=True)
            stats.num_tensors += 1
            stats.bytes_read = checkpoint.stats.bytes_read - start_read
            if bar is not None:
                bar.advance(entry_nbytes(entry, decision) or 0)
            assert decision.local_key is not None
            yield decision.local_key, tensor
    finally:
        if bar is not None:
            bar.close()
        stats.seconds += time.perf_counter() - started
        stats.files_opened = sorted(checkpoint.stats.files_opened)


def _prefetched(plan: Plan, checkpoint: Checkpoint) -> Iterator[tuple[EntryLike, Decision, torch.Tensor]]:
    """Owned tensors in plan order, read by two threads ahead of the consumer.

    Reads copy from storage or the page cache with the GIL released, so a second reader overlaps the Python
    work of the first. Small tensors go in batches of about `_BATCH_BYTES`, so that handing work to a thread
    costs little next to the work; at most `_PREFETCH_BYTES` is read ahead, which bounds staging memory.
    """
    batches = _batches(list(plan.owned_entries()))
    if len(batches) < 2:
        for batch in batches:
            yield from _read_batch(checkpoint, batch)
        return
    with ThreadPoolExecutor(max_workers=_READERS, thread_name_prefix="ownership-read") as pool:
        pending: deque[tuple[int, Future[list[tuple[EntryLike, Decision, torch.Tensor]]]]] = deque()
        ahead = 0
        submitted = 0
        try:
            while True:
                while submitted < len(batches) and (not pending or ahead < _PREFETCH_BYTES):
                    batch = batches[submitted]
                    submitted += 1
                    size = sum(entry_nbytes(entry, decision) or 0 for entry, decision in batch)
                    pending.append((size, pool.submit(_read_batch, checkpoint, batch)))
                    ahead += size
                if not pending:
                    return
                size, future = pending.popleft()
                ahead -= size
                yield from future.result()
        finally:
            for _, future in pending:
                future.cancel()


_Batch = list[tuple[EntryLike, Decision]]


def _batches(items: _Batch) -> list[_Batch]:
    batches: list[_Batch] = []
    current: _Batch = []
    size = 0
    for entry, decision in items:
        current.append((entry, decision))
        size += entry_nbytes(entry, decision) or 0
        if size >= _BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def _read_batch(checkpoint: Checkpoint, batch: _Batch) -> list[tuple[EntryLike, Decision, torch.Tensor]]:
    return [(entry, decision, checkpoint.read(entry.key, decision.selection)) for entry, decision in batch]


def _cast(tensor: torch.Tensor, dtype: torch.dtype, *, key: str) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    if not dtype.is_floating_point:
        raise CheckpointError(
            f"cannot cast a {tensor.dtype} tensor to {dtype}",
            key=key,
            found=str(tensor.dtype),
            expected="a floating-point target dtype",
            fix="pass a floating-point dtype such as torch.bfloat16, or none",
        )
    return tensor.to(dtype)


def load(
    ruleset: Ruleset,
    checkpoint: str | os.PathLike[str],
    *,
    mesh: MeshLike,
    rank: int,
    params: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> LoadResult:
    """Plan `rank`'s share of `checkpoint` from its headers and read exactly that.

    Params not given are read from the checkpoint's `config.json` where the ruleset names the config keys.
    """
    with open_checkpoint(checkpoint) as source:
        bound = ruleset.bind(mesh=mesh, params=params, config=source.config)
        plan = build_plan(bound, source.entries(), rank=rank)
        stats = LoadStats()
        tensors = dict(iter_load(plan, source, device=device, dtype=dtype, stats=stats, progress=progress))
    return LoadResult(tensors=tensors, plan=plan, stats=stats)


class _Bar:
    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=True,
        )
        self._task = self._progress.add_task("loading", total=total)
        self._progress.start()

    def advance(self, num_bytes: int) -> None:
        self._progress.advance(self._task, num_bytes)

    def close(self) -> None:
        self._progress.stop()


def _progress(total: int, wanted: bool | None) -> _Bar | None:
    if wanted is None:
        wanted = sys.stderr.isatty() and total >= _PROGRESS_MIN_BYTES
    return _Bar(total) if wanted else None
