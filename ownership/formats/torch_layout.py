"""Where each tensor of a zip `torch.save` file lives, read from its pickle without building any tensor.

`torch.load(mmap=True)` makes a storage object per tensor, which costs about 0.2 ms each: 2 s for an adapter of
9,000 tensors, ten times the time of reading one rank's share. This module reads the same pickle with the C
unpickler restricted to an allow-list: `find_class` hands out only stand-ins for `_rebuild_tensor_v2`, the
storage types and `OrderedDict`, and storages resolve to records of the zip, so no code from the file ever runs.
What it cannot describe (other classes, non-contiguous tensors, compressed records) returns None, and the caller
falls back to `torch.load(weights_only=True)`, which reports the problem.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "w.bin"
    >>> torch.save({"w": torch.zeros(2, 3)}, path)
    >>> layout = tensor_layout(path)
    >>> layout["w"].dtype, layout["w"].shape, layout["w"].within
    ('F32', (2, 3), 0)
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ownership.gcpause import paused_gc

__all__ = ["TensorLayout", "data_offset", "data_offset_from", "tensor_layout"]

_STORAGE_DTYPES = {
    "DoubleStorage": ("F64", 8),
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """A tensor's dtype, shape, and where its bytes are: `within` bytes into the zip record whose local header
    starts at `record` (row-major, uncompressed). `data_offset` turns that into a file offset."""

    dtype: str
    shape: tuple[int, ...]
    record: int
    within: int


# Tuples, not dataclasses: one of each is made per tensor, and an adapter can hold tens of thousands.
class _Storage(NamedTuple):
    dtype: str
    itemsize: int
    key: str
    numel: int


class _StorageType(NamedTuple):
    dtype: str
    itemsize: int


class _Tensor(NamedTuple):
    storage: _Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    if type(storage) is not _Storage or type(storage_offset) is not int:
        raise pickle.UnpicklingError("tensor without a storage record")
    if type(size) is not tuple or type(stride) is not tuple:
        raise pickle.UnpicklingError("tensor size or stride is not a tuple")
    return _Tensor(storage, storage_offset, size, stride)


class _LayoutUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(*_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not on the allow-list")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unknown persistent id")
        storage_type, key, _, numel = pid[1:]
        if type(storage_type) is not _StorageType or type(numel) is not int:
            raise pickle.UnpicklingError("unknown storage type")
        return _Storage(storage_type.dtype, storage_type.itemsize, str(key), numel)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if len(shape) != len(stride):
        return False
    expected = 1
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] != 1 and stride[i] != expected:
            return False
        expected *= shape[i]
    return True


def _central_directory(handle: BinaryIO, size: int) -> dict[str, tuple[int, int]]:
    """Member name -> (local header offset, compression method), read straight from the zip's central directory.

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
    members: dict[str, tuple[int, int]] = {}
    position = 0
    for _ in range(num_entries):
        if directory[position : position + 4] != b"PK\x01\x02":
            raise zipfile.BadZipFile("bad central directory entry")
        (method,) = struct.unpack_from("<H", directory, position + 10)
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", directory, position + 28)
        (offset,) = struct.unpack_from("<I", directory, position + 42)
        name = directory[position + 46 : position + 46 + name_length].decode("utf-8")
        if offset == 0xFFFFFFFF:
            offset = _zip64_offset(
                directory, position + 46 + name_length, extra_length, directory_entry=position
            )
        members[name] = (offset, method)
        position += 46 + name_length + extra_length + comment_length
    return members


def _zip64_offset(directory: bytes, start: int, length: int, *, directory_entry: int) -> int:
    """The local header offset from a zip64 extra field (after the sizes that overflowed too)."""
    uncompressed, compressed = struct.unpack_from("<II", directory, directory_entry + 20)[::-1]
    position = start
    while position + 4 <= start + length:
        header, field_length = struct.unpack_from("<HH", directory, position)
        if header == 1:
            skip = 8 * ((uncompressed == 0xFFFFFFFF) + (compressed == 0xFFFFFFFF))
            (offset,) = struct.unpack_from("<Q", directory, position + 4 + skip)
            return int(offset)
        position += 4 + field_length
    raise zipfile.BadZipFile("zip64 offset missing")


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


def tensor_layout(path: Path) -> dict[str, TensorLayout] | None:
    """Layout of every tensor of a flat state dict saved by `torch.save`, or None where it cannot be told."""
    with paused_gc():
        return _tensor_layout(path)


def _tensor_layout(path: Path) -> dict[str, TensorLayout] | None:
    try:
        with path.open("rb") as handle:
            members = _central_directory(handle, path.stat().st_size)
            pickles = [name for name in members if name.endswith("/data.pkl")]
            if len(pickles) != 1 or any(method != 0 for _, method in members.values()):
                return None
            prefix = pickles[0][: -len("data.pkl")]
            pickle_offset = data_offset(handle, members[pickles[0]][0])
            pickle_end = min(
                (offset for offset, _ in members.values() if offset > members[pickles[0]][0]),
                default=path.stat().st_size,
            )
            handle.seek(pickle_offset)
            state = _LayoutUnpickler(io.BytesIO(handle.read(pickle_end - pickle_offset))).load()
            data = prefix + "data/"
            # Local headers are read only for the tensors a rank reads (`data_offset`), not for all of them.
            records = {
                name[len(data) :]: offset for name, (offset, _) in members.items() if name.startswith(data)
            }
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
    if not isinstance(state, dict):
        return None
    layout: dict[str, TensorLayout] = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or type(tensor) is not _Tensor:
            return None
        if not all(type(x) is int for x in (*tensor.shape, *tensor.stride)):
            return None
        numel = 1
        for size in tensor.shape:
            numel *= size
        if (
            tensor.storage.key not in records
            or not _contiguous(tensor.shape, tensor.stride)
            or tensor.storage_offset + numel > tensor.storage.numel
        ):
            return None
        within = tensor.storage_offset * tensor.storage.itemsize
        layout[key] = TensorLayout(tensor.storage.dtype, tensor.shape, records[tensor.storage.key], within)
    return layout
