"""Selections: which elements of a tensor a rank owns, as runs of indices per dim, and their one text and JSON
form.

A `Selection` is `None` (the whole tensor) or a tuple with one item per dim. Each item is `None` (the whole dim)
or a tuple of runs `(start, stop, step)` over that dim's indices, in the order the rank stores them. The owned
part of the tensor is the product of the dims' index lists; its local shape is their lengths.

It stays plain data (ints and tuples, no torch), with one codec each way:

| form | write | read |
|---|---|---|
| JSON (plans, shard files, summaries): null, or per dim null or `[[start, stop, step], ...]` | `selection_to_json` | `selection_from_json` |
| text (`explain`, tables, case files): `all`, `[0:8, :]`, `[:, 1:24:6+2:24:6]` | `selection_text` | `parse_selection` |

Which bytes a reader pulls for a selection is the read planner's business (`ownership.formats.spans`).

Example:
    >>> runs_from_indices([0, 1, 2, 8, 9, 10])
    ((0, 3, 1), (8, 11, 1))
    >>> runs_from_indices([2, 3, 10, 11, 5, 13, 21])
    ((2, 4, 1), (10, 12, 1), (5, 22, 8))
    >>> selection_shape(((None, ((0, 3, 1), (8, 11, 1)))), (4, 16))
    (4, 6)
    >>> selection_text(parse_selection("[:, 4:23:6+1]"))
    '[:, 4:23:6+1]'
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

__all__ = [
    "DimSelection",
    "Run",
    "Selection",
    "dim_indices",
    "dim_length",
    "is_empty",
    "normalize_selection",
    "parse_selection",
    "run_length",
    "runs_from_indices",
    "selection_from_json",
    "selection_shape",
    "selection_text",
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


def is_empty(selection: Selection) -> bool:
    """Whether a selection keeps no element (some dim keeps no index)."""
    return selection is not None and any(dim is not None and not dim for dim in selection)


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


def selection_from_json(data: Any) -> Selection:
    """The selection of its JSON form (as `selection_to_json` writes it)."""
    if data is None:
        return None
    return tuple(None if dim is None else tuple((run[0], run[1], run[2]) for run in dim) for dim in data)


def _run_text(run: Run) -> str:
    start, stop, step = run
    if stop - start == 1:
        return str(start)
    return f"{start}:{stop}" if step == 1 else f"{start}:{stop}:{step}"


def selection_text(selection: Selection) -> str:
    """A selection in slice notation: `all` for the whole tensor, `[0:8, :]`, `[:, 1:24:6+2:24:6]`."""
    if selection is None:
        return "all"
    dims = [":" if dim is None else "+".join(_run_text(run) for run in dim) for dim in selection]
    return "[" + ", ".join(dims) + "]"


_INT = r"\s*(-?\d+)\s*"
_RUN = re.compile(rf"{_INT}(?::{_INT}(?::{_INT})?)?\Z")


def parse_selection(value: Any) -> Selection:
    """A selection from its written forms: slice text as `selection_text` writes it, or a list (TOML has no
    null, so a whole dim is `":"`).

    Text: `all`, or `[dim, dim, ...]` where a dim is `:` (whole) or runs joined by `+`, each `i`, `a:b` or
    `a:b:step`. List: one item per dim, `":"` or a list of `[start, stop, step]`. A malformed value is a
    `ValueError` saying what was expected.

        >>> parse_selection("[:, 4:23:6+1]")
        (None, ((4, 23, 6), (1, 2, 1)))
        >>> parse_selection([[[24, 32, 1]], ":"]) == parse_selection("[24:32, :]")
        True
    """
    if isinstance(value, str):
        return _parse_selection_text(value)
    if isinstance(value, list):
        return tuple(_parse_dim_list(item) for item in value)
    raise ValueError(f"a selection is slice text such as '[0:8, :]' or a list of dims, not {value!r}")


def _parse_selection_text(text: str) -> Selection:
    body = text.strip()
    if body == "all":
        return None
    if not (body.startswith("[") and body.endswith("]")) or not body[1:-1].strip():
        raise ValueError(f"selection {text!r} is not `all` or `[dim, ...]` (e.g. '[0:8, :]')")
    return tuple(_parse_dim_text(dim, text) for dim in body[1:-1].split(","))


def _parse_dim_text(dim: str, text: str) -> DimSelection:
    if dim.strip() == ":":
        return None
    runs: list[Run] = []
    for piece in dim.split("+"):
        m = _RUN.match(piece)
        if m is None:
            raise ValueError(f"selection {text!r}: cannot read {piece.strip()!r}; write i, a:b or a:b:step")
        start, stop, step = m.groups()
        first = int(start)
        runs.append((first, first + 1 if stop is None else int(stop), 1 if step is None else int(step)))
    return _checked_runs(runs, repr(text))


def _parse_dim_list(item: Any) -> DimSelection:
    if item == ":":
        return None
    if isinstance(item, list) and all(
        isinstance(run, list) and len(run) == 3 and all(type(x) is int for x in run) for run in item
    ):
        return _checked_runs([(run[0], run[1], run[2]) for run in item], repr(item))
    raise ValueError(f'a dim of a selection list is ":" or a list of [start, stop, step] runs, not {item!r}')


def _checked_runs(runs: list[Run], text: str) -> tuple[Run, ...]:
    for start, _, step in runs:
        if start < 0 or step < 1:
            raise ValueError(f"selection {text}: runs need start >= 0 and step >= 1")
    return tuple(runs)
