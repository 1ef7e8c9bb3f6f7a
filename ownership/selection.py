"""Selections: which elements of a tensor a rank owns, as runs of indices per dim.

A `Selection` is `None` (the whole tensor) or a tuple with one item per dim. Each item is `None` (the whole dim)
or a tuple of runs `(start, stop, step)` over that dim's indices, in the order the rank stores them. The owned
part of the tensor is the product of the dims' index lists; its local shape is their lengths.

This is the structure the JSON plan prints (`[[start, stop, step], ...]`) and the loader reads, so it stays
plain data: ints and tuples, no torch.

Example:
    >>> runs_from_indices([0, 1, 2, 8, 9, 10])
    ((0, 3, 1), (8, 11, 1))
    >>> runs_from_indices([2, 3, 10, 11, 5, 13, 21])
    ((2, 4, 1), (10, 12, 1), (5, 22, 8))
    >>> selection_shape(((None, ((0, 3, 1), (8, 11, 1)))), (4, 16))
    (4, 6)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeAlias

__all__ = [
    "DimSelection",
    "Run",
    "Selection",
    "dim_indices",
    "dim_length",
    "normalize_selection",
    "run_length",
    "runs_from_indices",
    "selection_nbytes_fraction",
    "selection_read_count",
    "selection_shape",
    "selection_to_json",
]

Run: TypeAlias = tuple[int, int, int]
DimSelection: TypeAlias = tuple[Run, ...] | None
Selection: TypeAlias = tuple[DimSelection, ...] | None


def run_length(run: Run) -> int:
    """Number of indices in `range(*run)`."""
    return len(range(*run))


def dim_length(dim: DimSelection, size: int) -> int:
    """Number of indices a dim selection keeps out of a dim of `size`."""
    if dim is None:
        return size
    return sum(run_length(run) for run in dim)


def dim_indices(dim: DimSelection, size: int) -> Iterator[int]:
    """The kept indices of a dim, in stored order."""
    if dim is None:
        yield from range(size)
        return
    for run in dim:
        yield from range(*run)


def selection_shape(selection: Selection, shape: Sequence[int]) -> tuple[int, ...]:
    """Local shape of `selection` applied to a tensor of `shape`."""
    if selection is None:
        return tuple(shape)
    return tuple(dim_length(dim, size) for dim, size in zip(selection, shape, strict=True))


def selection_nbytes_fraction(selection: Selection, shape: Sequence[int]) -> float:
    """Fraction of the tensor's elements that `selection` keeps (1.0 for the whole tensor)."""
    if selection is None:
        return 1.0
    fraction = 1.0
    for dim, size in zip(selection, shape, strict=True):
        if dim is not None and size:
            fraction *= dim_length(dim, size) / size
    return fraction


def selection_read_count(selection: Selection, shape: Sequence[int]) -> int:
    """Elements a row-wise reader pulls from storage: the selected elements when only the first dim is
    selected, else every element of the selected rows (a row's strided elements share its pages)."""
    if selection is None or all(dim is None for dim in selection[1:]):
        local = selection_shape(selection, shape)
    else:
        local = selection_shape((selection[0], *([None] * (len(shape) - 1))), shape)
    count = 1
    for size in local:
        count *= size
    return count


def runs_from_indices(indices: Sequence[int]) -> tuple[Run, ...]:
    """Compress an ordered index list into maximal arithmetic runs, left to right, keeping the order.

    Contiguous blocks are preferred: a strided run is only taken where it covers at least three indices.
    """
    return _greedy_runs(indices)


def _greedy_runs(indices: Sequence[int]) -> tuple[Run, ...]:
    runs: list[Run] = []
    i, n = 0, len(indices)
    while i < n:
        start = indices[i]
        if i + 1 == n:
            runs.append((start, start + 1, 1))
            break
        step = indices[i + 1] - start
        if step <= 0:
            runs.append((start, start + 1, 1))
            i += 1
            continue
        j = i + 1
        while j + 1 < n and indices[j + 1] - indices[j] == step:
            j += 1
        if step > 1 and j == i + 1:
            # A strided pair is no better than a singleton, and the second index may start a block.
            j = i
            step = 1
        runs.append((start, indices[j] + 1, step))
        i = j + 1
    return tuple(runs)


def normalize_selection(selection: Sequence[DimSelection], shape: Sequence[int]) -> Selection:
    """Collapse dims that keep everything in order to `None`, and the whole selection to `None` if all do."""
    out: list[DimSelection] = []
    for dim, size in zip(selection, shape, strict=True):
        if dim is not None and len(dim) == 1 and dim[0] == (0, size, 1):
            dim = None
        out.append(dim)
    if all(dim is None for dim in out):
        return None
    return tuple(out)


def selection_to_json(selection: Selection) -> list[list[list[int]] | None] | None:
    """The JSON form: null, or one item per dim (null or a list of `[start, stop, step]`)."""
    if selection is None:
        return None
    return [None if dim is None else [list(run) for run in dim] for dim in selection]
