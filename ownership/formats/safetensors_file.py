"""A single safetensors file: entries from its JSON header, reads of exactly the owned rows (see `pread`).

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
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from ownership.errors import CheckpointError, short
from ownership.formats.base import Entry
from ownership.formats.dtypes import DTYPE_ITEMSIZE, unknown_dtype
from ownership.formats.single import SingleFile
from ownership.gcpause import paused_gc
from ownership.limits import MAX_HEADER_BYTES, MAX_KEY_LENGTH, over_limit, parse_json

__all__ = ["SafetensorsFile"]


def _parse(path: Path, *, display: str) -> tuple[list[tuple[str, Any]], int, int, str]:
    """The header's `(key, info)` items in the order of their bytes, where data starts, how many data bytes
    follow, and the file's name; a file too short for its header or a header that is not a JSON object is a
    `CheckpointError`."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(display, f"{size} bytes", "at least 8 bytes of header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
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
        header: dict[str, Any] = parse_json(raw, source=display, what="the header")
    except CheckpointError as error:
        raise _corrupt(display, f"a header that is not JSON ({error.found})", "a JSON header") from None
    if not isinstance(header, dict):
        raise _corrupt(display, "a header that is not a JSON object", "a JSON object")
    header.pop("__metadata__", None)
    # JSON keeps the last of a key given twice: the other tensor's bytes would load under its name. Each entry
    # names its offsets once, so a count that differs from the entries is a duplicate (or that text in a name).
    if raw.count(b'"data_offsets"') != len(header):
        duplicate = _duplicate_key(raw)
        if duplicate is not None:
            raise _corrupt(
                display, f"the key {duplicate!r} twice in the header", "each key once", key=duplicate
            )
    items = list(header.items())
    # Safetensors lists keys in the order of their bytes; other writers may not, and entries follow the bytes.
    try:
        starts = [info["data_offsets"][0] for _, info in items]
        ordered = all(a <= b for a, b in pairwise(starts))
    except (KeyError, TypeError, IndexError):
        ordered = False
    if not ordered:
        items.sort(key=lambda item: _start(item[1]))
    return items, 8 + length, size - 8 - length, path.name


def _duplicate_key(raw: bytes) -> str | None:
    """The first key that some object of the header gives twice, or None."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found[0] if found else None


def _start(info: Any) -> int:
    """Where an entry's bytes start, for ordering; a malformed entry sorts first and is reported by `_scan`."""
    try:
        return int(info["data_offsets"][0])
    except (KeyError, TypeError, IndexError, ValueError):
        return -1


def _scan(
    items: list[tuple[str, Any]], base: int, data_size: int, name: str, *, display: str
) -> Iterator[Entry]:
    """Each header item as an entry, checked as strictly as the safetensors library checks it: dtype known,
    shape of non-negative ints, data offsets as long as the shape says, and tiling the data exactly (each
    tensor's bytes start where the one before ends, and the last ends at the end of the file)."""
    itemsizes, new = DTYPE_ITEMSIZE, tuple.__new__
    max_key, previous, previous_end = MAX_KEY_LENGTH, "", 0
    # A few operations per entry: headers of MoE adapters hold tens of thousands of entries.
    for key, info in items:
        if len(key) > max_key:
            raise over_limit(
                "a key of the header", name="MAX_KEY_LENGTH", found=f"{len(key):,} characters", source=display
            )
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            nbytes = itemsizes[dtype]
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    raise ValueError(shape)
                nbytes *= dim
        except (KeyError, TypeError, ValueError):
            if isinstance(info, dict) and "dtype" in info and info["dtype"] not in DTYPE_ITEMSIZE:
                raise unknown_dtype(str(info["dtype"]), key=key, source=display) from None
            raise _corrupt(
                display, f"a malformed header entry {short(info)}", "dtype, shape and data_offsets", key=key
            ) from None
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size):
            raise _corrupt(
                display,
                f"data offsets [{begin}, {end}] past the {data_size} data bytes",
                "offsets inside the file (truncated file?)",
                key=key,
            )
        if end - begin != nbytes:
            raise _corrupt(
                display,
                f"{end - begin} bytes for shape {short(list(shape))} of {dtype}",
                f"{nbytes} bytes",
                key=key,
            )
        if begin != previous_end:
            where = f"after {previous!r}" if previous else "at the start of the data"
            found = "overlapping" if begin < previous_end else "leaving a hole"
            raise _corrupt(
                display,
                f"data offsets [{begin}, {end}] {found} {where}, which ends at {previous_end}",
                "each tensor's bytes right after the one before, as safetensors writes them",
                key=key,
            )
        previous, previous_end = key, end
        # Entry is a NamedTuple: building it from a tuple skips its argument parsing.
        yield new(Entry, (key, dtype, shape, name, base + begin))
    if previous_end != data_size:
        raise _corrupt(
            display,
            f"{data_size - previous_end} bytes after the last tensor's",
            "a file that ends with the last tensor, as safetensors writes it",
        )


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

    def _open(self) -> Iterator[Entry]:
        with paused_gc():
            parsed = _parse(self.root, display=self.display)
        return _scan(*parsed, display=self.display)
