"""Checkpoint dtype names (safetensors spelling) and their sizes in bytes.

Example:
    >>> dtype_itemsize("BF16")
    2
"""

from __future__ import annotations

from ownership.errors import CheckpointError

__all__ = ["DTYPE_ITEMSIZE", "dtype_itemsize"]

DTYPE_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
}


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name."""
    size = DTYPE_ITEMSIZE.get(dtype)
    if size is not None:
        return size
    try:
        return DTYPE_ITEMSIZE[dtype.upper()]
    except KeyError:
        raise CheckpointError(
            f"unknown dtype {dtype!r}",
            found=repr(dtype),
            expected=f"one of {', '.join(DTYPE_ITEMSIZE)}",
            fix="use safetensors dtype names (F32, BF16, ...)",
        ) from None
