"""What every one-file back-end shares: entries listed as its header is read, a row reader, and reads at an
entry's offset, one at a time or many with few system calls.

A back-end reads and checks its header's framing when opened (`_open`), so a file that is not what its name says
fails at once, and hands back an iterator that makes and checks one entry at a time. `iter_entries` yields each
as soon as it is made: a loader reads the first owned tensors while later entries are still being listed.

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from ownership.formats.safetensors_file import SafetensorsFile
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"a": torch.arange(4.0), "b": torch.ones(2)}, path)
    >>> with SafetensorsFile(path) as f:
    ...     isinstance(f, SingleFile), [e.key for e in f.iter_entries()], f.read_many([("b", None)])[0].tolist()
    (True, ['a', 'b'], [1.0, 1.0])
"""

from __future__ import annotations

import os
import threading
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ownership.errors import CheckpointError
from ownership.formats.base import ByteRuns, Checkpoint, Entry, PendingRead, ReadStats, check_selection
from ownership.formats.dtypes import dtype_itemsize, torch_dtype
from ownership.formats.spans import row_byte_spans
from ownership.gcpause import paused_gc
from ownership.placement.selection import Selection

if TYPE_CHECKING:
    import torch

    from ownership.formats.pread import PendingReads, Prelude, ReadRequest, RowReader

__all__ = ["SingleFile"]

# Entries made per step of the listing: small enough that reading starts early, large enough that the lock
# taken per step costs nothing.
_STEP = 256


class SingleFile(Checkpoint):
    """A checkpoint stored in one file; subclasses read its header (`_open`) and say where a tensor's bytes
    start (`_locate`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: dict[str, Any] | None = None,
        display: str | None = None,
        stats: ReadStats | None = None,
        mmap: bool = True,
    ) -> None:
        path = Path(path)
        super().__init__(path, config=config, stats=stats, mmap=mmap)
        self.display = display or str(path)
        self.path = path
        # Made on the first read: listing (planning, linting) needs neither the reader nor torch.
        self._row_reader: RowReader | None = None
        self._entries: list[Entry] = []
        self._by_key: dict[str, Entry] = {}
        self._failure: CheckpointError | None = None
        self._lock = threading.Lock()
        self._scan: Iterator[Entry] | None = self._open()

    @property
    def _reader(self) -> RowReader:
        if self._row_reader is None:
            from ownership.formats.pread import RowReader

            self._row_reader = RowReader(
                self.path, stats=self.stats, display=self.display, map_pages=self.map_pages
            )
        return self._row_reader

    @abstractmethod
    def _open(self) -> Iterator[Entry]:
        """Read and check the header's framing now; return an iterator that makes and checks each entry, in
        file order. Called once, by `__init__`."""

    def _locate(self, entry: Entry) -> tuple[int | None, Prelude | None]:
        """Where the entry's bytes start, row-major (None where the back-end reads it another way,
        `_read_other`), and metadata to read along with them, which `_confirm` then checks."""
        return entry.offset, None

    def _confirm(self, entry: Entry, offset: int, prelude: Prelude) -> int | None:
        """After a read with a prelude: None where it confirms `offset`, else where the bytes really start."""
        return None

    def iter_entries(self) -> Iterator[Entry]:
        position = 0
        while True:
            entries = self._entries
            if position < len(entries):
                end = len(entries)
                yield from entries[position:end]
                position = end
            elif not self._list_more():
                return

    def _list_more(self) -> bool:
        """Make the next entries; False once there are no more."""
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._scan is None:
                return False
            try:
                made = list(islice(self._scan, _STEP))
            except CheckpointError as error:
                # Remembered: a later listing must fail the same way, not look complete.
                self._failure, self._scan = error, None
                raise
            if len(made) < _STEP:
                self._scan = None
            self._by_key.update((entry.key, entry) for entry in made)
            self._entries.extend(made)
            return bool(made)

    def entries(self) -> list[Entry]:
        with paused_gc():
            while self._list_more():
                pass
        return list(self._entries)

    def close(self) -> None:
        if self._row_reader is not None:
            self._row_reader.close()

    def _checked(self, key: str, selection: Selection) -> Entry:
        """The entry of `key`, after checking that `selection` fits it."""
        entry = self._by_key.get(key) or self.entry(key)
        check_selection(selection, entry.shape, key=key, source=self.display)
        return entry

    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        return self.read_many([(key, selection)])[0]

    def prepare_many(self, requests: Sequence[tuple[str, Selection]]) -> PendingRead:
        located: list[ReadRequest] = []
        preludes: list[Prelude | None] = []
        entries: list[Entry] = []
        others: list[tuple[int, Entry, Selection]] = []
        for slot, (key, selection) in enumerate(requests):
            entry = self._checked(key, selection)
            offset, prelude = self._locate(entry)
            if offset is None:
                others.append((slot, entry, selection))
                continue
            entries.append(entry)
            located.append(
                (offset, torch_dtype(entry.dtype, key=key, source=self.display), entry.shape, selection)
            )
            preludes.append(prelude)
        return _Pending(self, self._reader.prepare(located, preludes=preludes), entries, preludes, others)

    def files(self) -> list[Path]:
        return [self.path]

    def _data_offset(self, entry: Entry) -> int | None:
        """Where the entry's bytes start, row-major, without a prelude (None: the back-end reads it itself)."""
        return entry.offset

    def byte_runs(self, key: str, selection: Selection = None) -> ByteRuns | None:
        entry = self._checked(key, selection)
        spans = row_byte_spans(selection, shape=entry.shape, itemsize=dtype_itemsize(entry.dtype))
        offset = None if spans is None else self._data_offset(entry)
        if spans is None or offset is None:
            return None
        return ByteRuns(self.path, [(offset + lo, hi - lo) for lo, hi in spans])

    def _read_other(self, entry: Entry, selection: Selection) -> torch.Tensor:
        """Read an entry that has no data offset; back-ends whose entries all have one never get here."""
        raise CheckpointError(
            "tensor bytes are not stored row-major at a known offset",
            source=self.display,
            key=entry.key,
            fix="re-save the checkpoint as safetensors",
        )


class _Pending(PendingRead):
    """A one-file `prepare_many`: row-major reads in one `PendingReads`; the rest (`others`) in `run()`."""

    def __init__(
        self,
        file: SingleFile,
        reads: PendingReads,
        entries: list[Entry],
        preludes: list[Prelude | None],
        others: list[tuple[int, Entry, Selection]],
    ) -> None:
        self.file = file
        self.reads = reads
        self.entries = entries
        self.preludes = preludes
        self.others = others
        self.other_tensors: list[torch.Tensor] = []

    def run(self) -> None:
        self.reads.run()
        self.other_tensors = [self.file._read_other(entry, selection) for _, entry, selection in self.others]

    def result(self) -> list[torch.Tensor]:
        file = self.file
        out: list[torch.Tensor] = []
        reads = self.reads
        for entry, tensor, prelude, request in zip(
            self.entries, reads.tensors, self.preludes, reads.requests, strict=True
        ):
            offset, dtype, shape, selection = request
            moved = None if prelude is None else file._confirm(entry, offset, prelude)
            # A prelude that says the bytes lie elsewhere: read them again from there.
            out.append(tensor if moved is None else file._reader.read(moved, dtype, shape, selection))
        for (slot, _, _), tensor in zip(self.others, self.other_tensors, strict=True):
            out.insert(slot, tensor)
        return out
