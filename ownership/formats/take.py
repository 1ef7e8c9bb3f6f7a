"""Applying a selection to a tensor already in memory (or memory-mapped), copying only the selected elements.

Example:
    >>> import torch
    >>> take(torch.arange(12).reshape(3, 4), (((0, 3, 2),), ((1, 3, 1),))).tolist()
    [[1, 2], [9, 10]]
"""

from __future__ import annotations

import torch

from ownership.placement.selection import DimSelection, Selection, dim_indices

__all__ = ["compact", "take", "take_dims"]


def _take_dim(tensor: torch.Tensor, d: int, dim: DimSelection) -> torch.Tensor:
    if dim is None:
        return tensor
    if len(dim) == 1:
        start, stop, step = dim[0]
        if step == 1:
            return tensor.narrow(d, start, stop - start)
        return tensor.narrow(d, start, stop - start)[(slice(None),) * d + (slice(None, None, step),)]
    index = torch.tensor(list(dim_indices(dim, tensor.shape[d])), dtype=torch.long)
    return tensor.index_select(d, index)


def take_dims(tensor: torch.Tensor, selection: Selection, *, first: int = 0) -> torch.Tensor:
    """`tensor` with the selection of dims `first..` applied (views where possible)."""
    if selection is None:
        return tensor
    for d in range(first, len(selection)):
        tensor = _take_dim(tensor, d, selection[d])
    return tensor


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if it owns exactly its bytes, else a contiguous copy that does.

    A view of a larger buffer (even one that is contiguous, as a slice of size-1 dims is) would keep the
    whole buffer alive and cannot be reinterpreted with `.view(dtype)`.
    """
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def take(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The selected elements as a new contiguous tensor that shares no memory with `tensor`."""
    out = take_dims(tensor, selection)
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)
    return compact(out)
