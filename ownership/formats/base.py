"""Entries, read statistics and the interface every checkpoint back-end implements.

An `Entry` is what a checkpoint's headers say about one tensor: key, dtype, shape and the file holding its
bytes. A `Checkpoint` lists entries without touching tensor data and reads one key with a selection (see
`ownership.placement.selection`), counting the bytes it pulls from storage in `stats`; `byte_runs` says where a
selection's bytes are, for readers of their own (the CUDA staging path).

Example:
    >>> Entry("w", "BF16", (4, 8), "model.safetensors").nbytes
    64
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from ownership.errors import CheckpointError
from ownership.formats.dtypes import dtype_itemsize
from ownership.placement.selection import Selection

if TYPE_CHECKING:
    import torch

__all__ = [
    "TORCH_SUFFIXES",
    "ByteRuns",
    "Checkpoint",
    "Entry",
    "PendingRead",
    "ReadStats",
    "check_selection",
]

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
"""File suffixes of PyTorch checkpoints (`torch.save` zips and old pickles)."""


class ByteRuns(NamedTuple):
    """Where a selection's owned bytes are: runs `(offset, length)` of one file, in the selection's order."""

    path: Path
    runs: list[tuple[int, int]]


class Entry(NamedTuple):
    """One tensor as a checkpoint's headers describe it (a tuple: listings make one per tensor)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int | None = None
    """Where the tensor's bytes start in `file`, when its header says so (safetensors); a `.bin` member's
    offset needs its zip local header and is resolved on first read (`TorchFile.data_offset`)."""

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * dtype_itemsize(self.dtype)


@dataclass
class ReadStats:
    """Running totals of tensor bytes pulled from storage, and of the files opened for tensor data."""

    bytes_read: int = 0
    files_opened: set[str] = field(default_factory=set)


def check_selection(selection: Selection, shape: tuple[int, ...], *, key: str, source: str) -> None:
    """A `CheckpointError` unless `selection` fits a tensor of `shape`."""
    if selection is None:
        return
    if len(selection) != len(shape):
        raise CheckpointError(
            "selection does not fit the tensor",
            source=source,
            key=key,
            found=f"{len(selection)} dims selected",
            expected=f"{len(shape)} (shape {list(shape)})",
            fix="plan with the checkpoint's own shapes",
        )
    for d, (dim, size) in enumerate(zip(selection, shape, strict=True)):
        for run in dim or ():
            start, stop, step = run
            if (
                step <= 0
                or not 0 <= start <= size
                or not 0 <= stop <= size
                or (start < stop and stop - 1 >= size)
            ):
                raise CheckpointError(
                    f"selection run {list(run)} on dim {d} is outside the tensor",
                    source=source,
                    key=key,
                    found=f"run {list(run)}",
                    expected=f"indices within 0..{size - 1} and step >= 1 (shape {list(shape)})",
                    fix="plan with the checkpoint's own shapes",
                )


class Checkpoint(ABC):
    """A checkpoint back-end: list entries from headers, read one key with a selection."""

    kind: str = ""

    def __init__(
        self,
        root: Path,
        *,
        config: dict[str, Any] | None = None,
        stats: ReadStats | None = None,
        mmap: bool = True,
    ) -> None:
        self.root = root
        self.config = config
        self.stats = stats if stats is not None else ReadStats()
        self.map_pages = mmap
        """Hand out large whole-row reads as copy-on-write views of the file's pages, populated, instead of
        copies (`ownership.formats.mapped`); False (`mmap=False`) for tensors in private memory."""

    @abstractmethod
    def entries(self) -> list[Entry]:
        """Every tensor, in file order, from headers and indexes alone."""

    def iter_entries(self) -> Iterator[Entry]:
        """The entries of `entries()`, each yielded as soon as its header is read (back-ends that list as they
        read say so), so reading owned tensors can start before the listing ends."""
        return iter(self.entries())

    @abstractmethod
    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        """Exactly the selected elements of one tensor, contiguous, in selection order."""

    def read_many(self, requests: Sequence[tuple[str, Selection]]) -> list[torch.Tensor]:
        """`read` of each `(key, selection)`, in order; back-ends read bytes that lie back to back in one call."""
        pending = self.prepare_many(requests)
        pending.run()
        return pending.result()

    def prepare_many(self, requests: Sequence[tuple[str, Selection]]) -> PendingRead:
        """`read_many` in two steps, for a loader that reads on other threads: this thread makes the tensors and
        plans the reads, `run()` reads, on any thread, and `result()` hands the tensors over, back here.

        Back-ends that make tensors here leave `run()` mostly system calls, so a reader thread seldom waits for
        the interpreter lock; this default does every `read` in `run()`.
        """
        return _ReadLater(self, requests)

    def files(self) -> list[Path]:
        """The files the checkpoint reads: its weights, and the index that names them."""
        return [self.root]

    def byte_runs(self, key: str, selection: Selection = None) -> ByteRuns | None:
        """Where the owned bytes of a selection that keeps whole rows lie in the checkpoint's files, or None
        where the back-end must read them itself (a selection that cuts later dims, a record it cannot place)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional: back-ends without open files keep the default
        """Release open files."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def entry(self, key: str) -> Entry:
        """The entry of `key`; an unknown key is a `CheckpointError`."""
        index: dict[str, Entry] | None = getattr(self, "_entry_index", None)
        if index is None:
            index = {e.key: e for e in self.entries()}
            self._entry_index = index
        try:
            return index[key]
        except KeyError:
            raise CheckpointError(
                "no such key in the checkpoint",
                source=str(self.root),
                key=key,
                found=f"{len(index)} keys, not this one",
                fix="list the keys with `ownership plan --all-ranks`, or check the spelling",
            ) from None


class PendingRead(ABC):
    """Reads prepared by `Checkpoint.prepare_many`."""

    @abstractmethod
    def run(self) -> None:
        """Do the reads; on any thread, once."""

    @abstractmethod
    def result(self) -> list[torch.Tensor]:
        """The tensors, once `run()` has returned; on the thread that prepared them."""


class _ReadLater(PendingRead):
    def __init__(self, checkpoint: Checkpoint, requests: Sequence[tuple[str, Selection]]) -> None:
        self.checkpoint = checkpoint
        self.requests = requests
        self.tensors: list[torch.Tensor] | None = None

    def run(self) -> None:
        self.tensors = [self.checkpoint.read(key, selection) for key, selection in self.requests]

    def result(self) -> list[torch.Tensor]:
        if self.tensors is None:
            raise RuntimeError("result() before run()")
        return self.tensors
