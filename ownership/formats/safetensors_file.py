"""A single safetensors file: entries from its JSON header, reads of exactly the owned rows (see `rows`).

Example:
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> path = tempfile.mkdtemp() + "/w.safetensors"
    >>> save_file({"w": torch.arange(12.0).reshape(4, 3)}, path)
    >>> with SafetensorsFile(path) as f:
    ...     f.read("w", (((2, 4, 1),), None)).tolist(), f.stats.bytes_read
    ([[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]], 24)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ownership.dtypes import DTYPE_ITEMSIZE
from ownership.errors import CheckpointError
from ownership.formats.entry import Entry, torch_dtype
from ownership.formats.single import SingleFile
from ownership.gcpause import paused_gc
from ownership.selection import Selection

__all__ = ["SafetensorsFile", "read_header"]

_MAX_HEADER = 100 * 2**20


def read_header(path: Path, *, display: str) -> list[Entry]:
    """Entries in file order, each with the absolute offset of its bytes; every range checked against the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(display, f"{size} bytes", "at least 8 bytes of header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, _MAX_HEADER):
                raise _corrupt(
                    display,
                    f"header length {length} in a file of {size} bytes",
                    "a header that fits in the file (truncated download?)",
                )
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointError(
            "cannot read the file", source=display, found=error.strerror, fix="check the path and permissions"
        ) from None
    try:
        header: dict[str, Any] = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(display, f"a header that is not JSON ({error})", "a JSON header") from None
    if not isinstance(header, dict):
        raise _corrupt(display, "a header that is not a JSON object", "a JSON object")
    data_size = size - 8 - length
    entries: list[Entry] = []
    name = path.name
    base = 8 + length
    itemsizes = DTYPE_ITEMSIZE
    # One pass, a few operations per entry: headers of MoE adapters hold tens of thousands of entries.
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            nbytes = itemsizes[dtype]
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    raise ValueError(shape)
                nbytes *= dim
        except (KeyError, TypeError, ValueError):
            if isinstance(info, dict) and "dtype" in info and info["dtype"] not in DTYPE_ITEMSIZE:
                torch_dtype(str(info["dtype"]), key=key, source=display)
            raise _corrupt(
                display, f"a malformed header entry {info!r}", "dtype, shape and data_offsets", key=key
            ) from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise _corrupt(
                display,
                f"data offsets [{begin}, {end}] past the {data_size} data bytes",
                "offsets inside the file (truncated file?)",
                key=key,
            )
        if end - begin != nbytes:
            raise _corrupt(
                display, f"{end - begin} bytes for shape {list(shape)} of {dtype}", f"{nbytes} bytes", key=key
            )
        entries.append(Entry(key, dtype, shape, name, base + begin))
    for dtype in {entry.dtype for entry in entries}:
        torch_dtype(dtype, key=next(e.key for e in entries if e.dtype == dtype), source=display)
    entries.sort(key=lambda entry: entry.offset or 0)
    return entries


def _corrupt(display: str, found: str, expected: str, *, key: str | None = None) -> CheckpointError:
    return CheckpointError(
        "corrupt or truncated safetensors file",
        source=display,
        key=key,
        found=found,
        expected=expected,
        fix="re-download or re-save the file",
    )


class SafetensorsFile(SingleFile):
    """One `.safetensors` file."""

    kind = "safetensors"

    def _list_entries(self) -> list[Entry]:
        with paused_gc():
            return read_header(self.root, display=self.display)

    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        return self._read_at_offset(self._checked(key, selection), selection)
