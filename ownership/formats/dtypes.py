"""The one dtype table: checkpoint dtype names (safetensors spelling), their sizes, their torch dtypes and the
storage classes `torch.save` pickles them as.

Sizes need no torch; the torch side is resolved on first use, and dtypes this torch lacks (float8 on an old
build) are simply absent from it.

Example:
    >>> dtype_itemsize("BF16")
    2
    >>> import torch
    >>> torch_dtype("F8_E4M3", key="k", source="s"), dtype_name(torch.bfloat16)
    (torch.float8_e4m3fn, 'BF16')
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from ownership.errors import CheckpointError, short

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "DTYPE_ITEMSIZE",
    "STORAGE_DTYPES",
    "DType",
    "as_torch_dtype",
    "dtype_itemsize",
    "dtype_name",
    "torch_dtype",
    "torch_dtypes",
    "unknown_dtype",
]


class DType(NamedTuple):
    """One dtype: its size in bytes, its `torch` attribute, and the pickled storage class of old `torch.save`
    files (None where torch.save never wrote one)."""

    itemsize: int
    torch_name: str
    storage: str | None = None


DTYPES: dict[str, DType] = {
    "F64": DType(8, "float64", "DoubleStorage"),
    "F32": DType(4, "float32", "FloatStorage"),
    "F16": DType(2, "float16", "HalfStorage"),
    "BF16": DType(2, "bfloat16", "BFloat16Storage"),
    "F8_E4M3": DType(1, "float8_e4m3fn"),
    "F8_E5M2": DType(1, "float8_e5m2"),
    "F8_E8M0": DType(1, "float8_e8m0fnu"),
    "I64": DType(8, "int64", "LongStorage"),
    "I32": DType(4, "int32", "IntStorage"),
    "I16": DType(2, "int16", "ShortStorage"),
    "I8": DType(1, "int8", "CharStorage"),
    "U64": DType(8, "uint64"),
    "U32": DType(4, "uint32"),
    "U16": DType(2, "uint16"),
    "U8": DType(1, "uint8", "ByteStorage"),
    "BOOL": DType(1, "bool", "BoolStorage"),
    "C64": DType(8, "complex64"),
}

DTYPE_ITEMSIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
"""Bytes per element, by name: the per-entry look-up of header scans."""

STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    dtype.storage: (name, dtype.itemsize) for name, dtype in DTYPES.items() if dtype.storage is not None
}
"""Pickled storage class -> (dtype name, itemsize)."""


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


@lru_cache(maxsize=1)
def torch_dtypes() -> dict[str, torch.dtype]:
    """Name -> torch dtype, for the dtypes this torch has."""
    import torch

    found = {name: getattr(torch, dtype.torch_name, None) for name, dtype in DTYPES.items()}
    return {name: value for name, value in found.items() if isinstance(value, torch.dtype)}


@lru_cache(maxsize=1)
def _names() -> dict[torch.dtype, str]:
    return {dtype: name for name, dtype in torch_dtypes().items()}


def torch_dtype(name: str, *, key: str, source: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return torch_dtypes()[name]
    except KeyError:
        raise unknown_dtype(name, key=key, source=source, known=list(torch_dtypes())) from None


_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
}


def as_torch_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or a name: torch's (`"bfloat16"`, `"torch.bfloat16"`), a common short one
    (`"bf16"`, `"fp16"`, `"half"`) or a safetensors one (`"BF16"`); anything else is a `CheckpointError`.

    Example:
        >>> as_torch_dtype("bf16"), as_torch_dtype("torch.float16"), as_torch_dtype("F32")
        (torch.bfloat16, torch.float16, torch.float32)
    """
    if value is None or not isinstance(value, str):
        return value
    import torch

    name = value.strip().removeprefix("torch.")
    if name in torch_dtypes():
        return torch_dtypes()[name]
    found = getattr(torch, _ALIASES.get(name.lower(), name.lower()), None)
    if isinstance(found, torch.dtype):
        return found
    raise CheckpointError(
        f"unknown dtype {value!r}",
        found=short(value),
        expected="a torch dtype or its name: bfloat16, float16, float32, bf16, fp16, fp32, BF16, ...",
        fix="pass dtype='bfloat16' (--dtype bfloat16)",
        code="bad-dtype",
    )


def unknown_dtype(name: str, *, key: str, source: str, known: list[str] | None = None) -> CheckpointError:
    """The error for a dtype this library (or, given `known`, this torch) cannot hold: no torch needed."""
    return CheckpointError(
        f"dtype {name!r} has no torch equivalent here",
        source=source,
        key=key,
        found=name if len(name) <= 80 else short(name),
        expected=f"one of {', '.join(DTYPES if known is None else known)}",
        fix="upgrade torch, or convert the checkpoint",
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _names().get(dtype, str(dtype).removeprefix("torch."))
