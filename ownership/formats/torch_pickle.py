"""Where each tensor of a zip `torch.save` file lives, read from its pickle without building any tensor.

`torch.load(mmap=True)` makes a storage object per tensor, which costs about 0.2 ms each: 2 s for an adapter of
9,000 tensors, ten times the time of reading one rank's share. This module reads the same pickle with the C
unpickler restricted to an allow-list: `find_class` hands out only stand-ins for `_rebuild_tensor_v2`, the
storage types and `OrderedDict`, and storages resolve to records of the zip, so no code from the file ever runs.

`read_pickle` does the part that needs the whole file (the zip's directory, the pickle); a pickle it cannot
describe (other classes, anything but a flat dict of tensors) gives None, and the caller falls back to
`torch.load(weights_only=True)`, which reports the problem. `PickledState.location` then places one tensor, so
a loader pays for the tensors it reads; one it cannot place (not contiguous, a compressed record) gives None and
is read through `torch.load` alone.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "w.bin"
    >>> torch.save({"w": torch.zeros(2, 3)}, path)
    >>> state = read_pickle(path)
    >>> state.dtype_shape("w"), state.location("w").within
    (('F32', (2, 3)), 0)
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ownership.formats.dtypes import STORAGE_DTYPES
from ownership.gcpause import paused_gc

__all__ = ["PickledState", "TensorLayout", "data_offset", "data_offset_from", "read_pickle"]


class TensorLayout(NamedTuple):
    """A tensor's dtype, shape, and where its bytes are: `within` bytes into the zip record whose local header
    starts at `record` (row-major, uncompressed). `data_offset` turns that into a file offset.

    `header` is the local header's length as `torch.save` writes it (each record's data starts on a multiple of
    64 bytes), so a reader can take the header with the data in one read; it is a prediction, true of every
    file torch.save wrote with its default alignment, and the header read says whether it held.
    """

    dtype: str
    shape: tuple[int, ...]
    record: int
    within: int
    header: int = 0


class _StorageType(NamedTuple):
    dtype: str
    itemsize: int


class _Tensor(NamedTuple):
    """A tensor record of the pickle, checked: what `_rebuild_tensor_v2` would have been given."""

    dtype: str
    itemsize: int
    storage: str
    numel: int
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _Malformed(NamedTuple):
    """A tensor record that is not as torch.save writes it; reported when its key is listed or read."""

    reason: str


def _rebuild_tensor_v2(*args: Any) -> _Tensor | _Malformed:
    """The stand-in for torch's `_rebuild_tensor_v2`: checks the record, builds nothing."""
    if len(args) < 4:
        return _Malformed(f"a tensor record of {len(args)} fields")
    pid, storage_offset, shape, stride = args[:4]
    # A storage's persistent id, as torch.save writes it: ("storage", type, key, location, numel).
    if not (
        type(pid) is tuple
        and len(pid) == 5
        and pid[0] == "storage"
        and type(pid[1]) is _StorageType
        and type(pid[4]) is int
        and type(storage_offset) is int
    ):
        return _Malformed("a tensor without a storage record")
    if type(shape) is not tuple or type(stride) is not tuple:
        return _Malformed("a tensor size or stride that is not a tuple")
    if storage_offset < 0 or pid[4] < 0:
        # A negative offset would read the bytes before the storage's record: zip headers and padding.
        return _Malformed(f"storage offset {storage_offset} of a storage of {pid[4]} elements")
    for size in shape:
        if type(size) is not int or size < 0:
            return _Malformed(f"shape {shape!r}")
    storage_type: _StorageType = pid[1]
    # tuple.__new__, not _Tensor(...): one record per tensor, and NamedTuple's own __new__ is a Python call.
    return tuple.__new__(
        _Tensor,
        (storage_type.dtype, storage_type.itemsize, str(pid[2]), pid[4], storage_offset, shape, stride),
    )


class _LayoutUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(*STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not on the allow-list")

    # The persistent id itself (a tuple, checked by `_rebuild_tensor_v2`): a built-in costs less per tensor than
    # a method.
    persistent_load = staticmethod(tuple)


def _extent(shape: tuple[int, ...], stride: tuple[Any, ...]) -> int | None:
    """Storage elements a tensor of `shape` and `stride` spans from its first (0 when it is empty); None for a
    stride that is not a tuple of non-negative ints of the shape's length."""
    if len(shape) != len(stride):
        return None
    extent = 1
    # Once per tensor of a checkpoint that may hold tens of thousands: a plain loop.
    for size, step in zip(shape, stride):  # noqa: B905 - the lengths are equal
        if type(step) is not int or step < 0:
            return None
        if size == 0:
            return 0
        extent += (size - 1) * step
    return extent


def _row_major_numel(shape: tuple[int, ...], stride: tuple[Any, ...]) -> int | None:
    """The element count of a row-major contiguous tensor of `shape` and `stride`; None for any other."""
    if len(shape) != len(stride):
        return None
    numel = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if type(step) is not int or (size != 1 and step != numel):
            return None
        numel *= size
    return numel


# A central directory entry's fixed 46 bytes: signature, flags, compression method, compressed and uncompressed
# sizes, name/extra/comment lengths and the local header's offset (the fields between are skipped).
_DIRECTORY_ENTRY = struct.Struct("<4s4xHH8xIIHHH8xI")
# Flag bit 3: a data descriptor (signature, CRC, sizes) follows the member's data.
_HAS_DESCRIPTOR = 0x08
_DESCRIPTOR_BYTES = 16


def _central_directory(handle: BinaryIO, size: int) -> dict[bytes, tuple[int, int, int, int]]:
    """Member name (as stored, UTF-8) -> (local header offset, compression method, flags, uncompressed size),
    read straight from the zip's central directory.

    `zipfile` builds a ZipInfo object per member; for tens of thousands of tensors that alone costs more than
    reading one rank's share, so the fixed-size records are unpacked here. Zip64 (files over 4 GiB) is handled.
    """
    tail_size = min(size, 65536 + 22)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0:
        raise zipfile.BadZipFile("no end of central directory")
    num_entries, cd_size, cd_offset = struct.unpack_from("<HII", tail, end + 10)
    if 0xFFFFFFFF in (cd_size, cd_offset) or num_entries == 0xFFFF:
        locator = tail.rfind(b"PK\x06\x07", 0, end)
        if locator < 0:
            raise zipfile.BadZipFile("zip64 without its locator")
        (zip64_end,) = struct.unpack_from("<Q", tail, locator + 8)
        handle.seek(zip64_end)
        record = handle.read(56)
        num_entries, cd_size, cd_offset = struct.unpack_from("<QQQ", record, 32)
    handle.seek(cd_offset)
    directory = handle.read(cd_size)
    members: dict[bytes, tuple[int, int, int, int]] = {}
    position = 0
    unpack = _DIRECTORY_ENTRY.unpack_from
    for _ in range(num_entries):
        (
            signature,
            flags,
            method,
            compressed,
            uncompressed,
            name_length,
            extra_length,
            comment_length,
            offset,
        ) = unpack(directory, position)
        if signature != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        name = directory[position + 46 : position + 46 + name_length]
        if 0xFFFFFFFF in (offset, compressed, uncompressed):
            uncompressed, compressed, offset = _zip64_fields(
                directory, position + 46 + name_length, extra_length, sizes=(uncompressed, compressed, offset)
            )
        members[name] = (offset, method, flags, uncompressed)
        position += 46 + name_length + extra_length + comment_length
    return members


def _zip64_fields(
    directory: bytes, start: int, length: int, *, sizes: tuple[int, int, int]
) -> tuple[int, int, int]:
    """(uncompressed size, compressed size, local header offset) with those that overflowed 32 bits read from
    the zip64 extra field, where they stand in that order."""
    position = start
    while position + 4 <= start + length:
        header, field_length = struct.unpack_from("<HH", directory, position)
        if header == 1:
            values, at = [], position + 4
            for value in sizes:
                if value == 0xFFFFFFFF:
                    (value,) = struct.unpack_from("<Q", directory, at)
                    at += 8
                values.append(int(value))
            return values[0], values[1], values[2]
        position += 4 + field_length
    raise zipfile.BadZipFile("zip64 fields missing")


def data_offset(handle: BinaryIO, local_header: int) -> int:
    """File offset of a stored zip member's data, from its local header."""
    handle.seek(local_header)
    return data_offset_from(handle.read(30), local_header)


def data_offset_from(local: bytes, local_header: int) -> int:
    """File offset of a stored zip member's data, from the 30 bytes of its local header."""
    if local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("bad local header")
    name_length, extra_length = struct.unpack_from("<HH", local, 26)
    return int(local_header + 30 + name_length + extra_length)


@dataclass
class PickledState:
    """A flat state dict as its pickle describes it: per key a tensor record, and the zip's records."""

    tensors: dict[str, _Tensor | _Malformed]
    records: dict[bytes, tuple[int, int, int, int]]
    """Member name -> (local header offset, compression method, flags, uncompressed size) of every record."""
    prefix: str = ""
    """The archive's folder of records (`<name>/data/`)."""
    descriptor: int = 0
    """Bytes of the data descriptor that ends each record, where the writer adds one (torch.save does): a reader
    that takes the one before a record's header along with it reads records that follow one another in one
    call."""

    def dtype_shape(self, key: str) -> tuple[str, tuple[int, ...]]:
        """The tensor's dtype name and shape; a malformed record is a ValueError saying how.

        Checked as strictly as torch.save writes them: the storage's zip record holds exactly its elements, and
        the tensor lies inside its storage (a tensor past its storage would read the next record's bytes).
        """
        tensor = self.tensors[key]
        if isinstance(tensor, _Malformed):
            raise ValueError(tensor.reason)
        record = self.records.get((self.prefix + tensor.storage).encode())
        if record is None:
            raise ValueError(f"no record {self.prefix + tensor.storage!r} for its storage")
        if record[3] != tensor.numel * tensor.itemsize:
            raise ValueError(
                f"a storage of {tensor.numel} elements of {tensor.itemsize} bytes in a record of {record[3]} bytes"
            )
        extent = _extent(tensor.shape, tensor.stride)
        if extent is None or tensor.storage_offset + extent > tensor.numel:
            raise ValueError(
                f"shape {list(tensor.shape)} and stride {list(tensor.stride)} from offset {tensor.storage_offset} "
                f"past the end of its storage of {tensor.numel} elements"
            )
        return tensor.dtype, tensor.shape

    def location(self, key: str) -> TensorLayout | None:
        """Where the tensor's bytes are, or None where they are not one row-major run of a stored record."""
        tensor = self.tensors[key]
        if isinstance(tensor, _Malformed):
            return None
        name = (self.prefix + tensor.storage).encode()
        record = self.records.get(name)
        numel = _row_major_numel(tensor.shape, tensor.stride)
        if record is None or record[1] != 0 or numel is None or tensor.storage_offset + numel > tensor.numel:
            return None
        within = tensor.storage_offset * tensor.itemsize
        return TensorLayout(tensor.dtype, tensor.shape, record[0], within, _header(record[0], len(name)))


# torch.save starts each record's data on a multiple of this, padding the local header's extra field.
_RECORD_ALIGNMENT = 64


def _header(record: int, name_length: int) -> int:
    """The local header's length torch.save writes: 30 fixed bytes, the name, and an extra field of at least its
    4-byte header (plus zip64 fields past 4 GiB) padded so that the data is aligned."""
    start = record + 30 + name_length + 4
    if record >= 0xFFFFFFFF:
        start += 4 + 8
    return -(-start // _RECORD_ALIGNMENT) * _RECORD_ALIGNMENT - record


def read_pickle(path: Path) -> PickledState | None:
    """The state dict pickled in a zip `torch.save` file, or None where it is not a flat dict of plain tensors
    (then `torch.load(weights_only=True)` must judge it)."""
    with paused_gc():
        return _read_pickle(path)


# Runs of the opcodes torch.save writes (protocol 2) whose arguments have a fixed size, matched in C; strings and
# globals, whose length is in the data, are stepped over one by one. A memo index (LONG_BINPUT, `r`) must have a
# zero top byte, or two for a pickle under 64 KiB (the C unpickler sizes its memo array by the largest index it is
# given: one hostile index would have it allocate tens of GB; these bounds keep it under 256 MiB, and 1 MiB for a
# small pickle). Any other opcode is not read here: the file goes to torch.load(weights_only=True).
_FIXED_RUN = (
    rb"(?:[qhK\x80][\x00-\xff]|[(})\]\x85\x86\x87tQRNbeasu.\x88\x89]|[jJ][\x00-\xff]{4}|M[\x00-\xff]{2}"
    rb"|G[\x00-\xff]{8}|r[\x00-\xff]{%d}\x00{%d})+"
)
_RUNS = {small: re.compile(_FIXED_RUN % ((2, 2) if small else (3, 1))) for small in (True, False)}


def _plausible(data: bytes) -> bool:
    """Whether `data` is a pickle of torch.save's opcodes whose memo indices stay small (see `_FIXED_RUN`)."""
    i, n, find = 0, len(data), data.find
    match = _RUNS[n < 2**16].match
    try:
        while i < n:
            run = match(data, i)
            if run is not None:
                i = run.end()
                if i >= n:
                    break
            op = data[i]
            if op in (0x58, 0x42, 0x54):  # BINUNICODE, BINBYTES, BINSTRING: a 4-byte length
                i += 5 + (data[i + 1] | data[i + 2] << 8 | data[i + 3] << 16 | data[i + 4] << 24)
            elif op in (0x55, 0x43, 0x8A):  # SHORT_BINSTRING, SHORT_BINBYTES, LONG1: a 1-byte length
                i += 2 + data[i + 1]
            elif op == 0x63:  # GLOBAL: module and name, a line each
                end = find(10, i + 1)
                i = find(10, end + 1) + 1 if end >= 0 else 0
                if i == 0:
                    return False
            else:
                return False
    except IndexError:
        return False
    return True


def _read_pickle(path: Path) -> PickledState | None:
    try:
        with path.open("rb") as handle:
            members = _central_directory(handle, path.stat().st_size)
            pickles = [name for name in members if name.endswith(b"/data.pkl")]
            if len(pickles) != 1 or members[pickles[0]][1] != 0:
                return None
            prefix = pickles[0][: -len(b"data.pkl")].decode("utf-8")
            handle.seek(data_offset(handle, members[pickles[0]][0]))
            size = members[pickles[0]][3]
            data = handle.read(min(size, path.stat().st_size))
            if len(data) != size or not _plausible(data):
                return None
            # Through a buffered reader, which the C unpickler reads with `peek`: from an `io.BytesIO`, which has
            # none, it makes a Python call per opcode, three times slower in all.
            state = _LayoutUnpickler(io.BufferedReader(io.BytesIO(data))).load()
    except (
        OSError,
        zipfile.BadZipFile,
        struct.error,
        UnicodeDecodeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ):
        return None
    if not isinstance(state, dict) or not all(
        type(key) is str and type(tensor) in (_Tensor, _Malformed) for key, tensor in state.items()
    ):
        return None
    # Local headers are read only for the tensors a rank reads, not for all of them.
    # One writer wrote every record: as the pickle's record ends, so do the others.
    descriptor = _DESCRIPTOR_BYTES if members[pickles[0]][2] & _HAS_DESCRIPTOR else 0
    return PickledState(state, members, prefix + "data/", descriptor)
