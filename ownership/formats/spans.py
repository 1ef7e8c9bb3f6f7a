"""The read planner: which byte spans a row-wise reader pulls from a file for a selection of a row-major tensor.

`row_byte_spans` gives the spans of selections that keep whole rows (the whole tensor, or runs of the first dim);
`row_reads` plans selections that cut later dims too, row by row, with the merging rules the readers follow
(`ownership.formats.pread`); `selection_read_bytes` totals what they pull, and `selection_read_count` bounds it
by whole rows.

Example:
    >>> row_byte_spans((((0, 2, 1), (2, 5, 2)), None), shape=(6, 3), itemsize=4)
    ((0, 36), (48, 60))
    >>> selection_read_bytes((None, ((0, 1024, 1),)), shape=(64, 8192), itemsize=4)
    262144
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import pairwise
from math import prod
from typing import NamedTuple, TypeAlias

from ownership.placement.selection import (
    DimSelection,
    Run,
    Selection,
    dim_indices,
    dim_length,
    selection_shape,
)

__all__ = [
    "BLOCK_BYTES",
    "PAGE_BYTES",
    "RowRead",
    "Span",
    "row_byte_spans",
    "row_reads",
    "selection_read_bytes",
    "selection_read_count",
]

Span: TypeAlias = tuple[int, int]

# Owned bytes closer than a page are read together with the gap between them: the gap's page is read anyway.
PAGE_BYTES = 4096
# Staging bound of a row-wise read: rows that need staging are read at most this many bytes at a time.
BLOCK_BYTES = 4 * 2**20
# Rows per `RowRead` read straight into the result: bounds the plan's size, not memory.
_DIRECT_ROWS = 1024


def selection_read_count(selection: Selection, shape: Sequence[int]) -> int:
    """Elements a whole-row reader pulls from storage: the selected elements when only the first dim is
    selected, else every element of the selected rows. An upper bound of what `RowReader` reads, whose exact
    count is `selection_read_bytes`."""
    if selection is None or all(dim is None for dim in selection[1:]):
        local = selection_shape(selection, shape)
    else:
        local = selection_shape((selection[0], *([None] * (len(shape) - 1))), shape)
    count = 1
    for size in local:
        count *= size
    return count


def row_byte_spans(selection: Selection, *, shape: Sequence[int], itemsize: int) -> tuple[Span, ...] | None:
    """Byte spans `[lo, hi)` from the tensor's start, in stored order, for a selection that keeps whole rows
    (the whole tensor, or runs of the first dim); adjacent spans are joined. None when it cuts later dims.

    Example:
        >>> row_byte_spans((((0, 2, 1), (2, 5, 2)), None), shape=(6, 3), itemsize=4)
        ((0, 36), (48, 60))
    """
    if selection is not None and any(dim is not None for dim in selection[1:]):
        return None
    row = itemsize
    for size in shape[1:]:
        row *= size
    if not shape:
        return ((0, itemsize),)
    if selection is None or selection[0] is None:
        return ((0, shape[0] * row),)
    spans: list[Span] = []
    for start, stop, step in selection[0]:
        rows = ((start, stop),) if step == 1 else ((index, index + 1) for index in range(start, stop, step))
        for first, end in rows:
            if end <= first:
                continue
            if spans and spans[-1][1] == first * row:
                spans[-1] = (spans[-1][0], end * row)
            else:
                spans.append((first * row, end * row))
    return tuple(spans)


def selection_read_bytes(
    selection: Selection,
    *,
    shape: Sequence[int],
    itemsize: int,
    page: int = PAGE_BYTES,
    block: int = BLOCK_BYTES,
) -> int:
    """Bytes `RowReader` pulls from storage for `selection`: the total of the spans of `row_reads`."""
    if not shape:
        return itemsize
    return sum(
        hi - lo
        for read in row_reads(selection, shape=shape, itemsize=itemsize, page=page, block=block)
        for lo, hi in read.spans
    )


class RowRead(NamedTuple):
    """One step of reading a selection of a row-major tensor: a window of rows of one dim.

    `spans` are byte intervals `[lo, hi)` relative to `offset` (bytes from the tensor's first byte), one read
    each. The rows land in `out[at][rows[0]:rows[1]]` of the result. With `staged` None the spans hold exactly
    those rows' owned elements in order and are read back to back straight into them; else `staged` is
    `(shape, selection)`: the spans are read into a staging window of `shape` at their own positions, and the
    selection applied to that window gives the rows. With `copy_from`, nothing is read: the one row is a copy of
    the result's row `out[at][copy_from]`, read before.
    """

    offset: int
    spans: tuple[Span, ...]
    at: tuple[int, ...]
    rows: tuple[int, int]
    staged: tuple[tuple[int, ...], Selection] | None
    copy_from: int | None = None


def row_reads(
    selection: Selection,
    *,
    shape: Sequence[int],
    itemsize: int,
    page: int = PAGE_BYTES,
    block: int = BLOCK_BYTES,
) -> Iterator[RowRead]:
    """The reads of `selection` of a row-major tensor of `shape` (at least one dim), first dim run by run.

    A selection of the first dim alone reads exactly its rows. Otherwise a row's owned bytes form spans,
    merged where less than `page` apart, and so do the spans of consecutive rows (never across rows that a
    strided run of the first dim skips); consecutive rows shorter than two pages are read as one block, from the
    first owned byte to the last. Where a row's owned elements are one span in stored order (a column range),
    each span not merged with the next row's is read straight into the result; other rows are staged at most
    `block` bytes at a time. Rows larger than `block` are read the same way one dim down.

    Example (`[64, 8192]` float32, columns 0:1024: one 4 KiB read per row, straight into the result):
        >>> reads = list(row_reads((None, ((0, 1024, 1),)), shape=(64, 8192), itemsize=4))
        >>> len(reads), len(reads[0].spans), reads[0].spans[1], reads[0].staged
        (1, 64, (32768, 36864), None)
    """
    if selection is None:
        dims: tuple[DimSelection, ...] = (None,) * len(shape)
    else:
        # Plain tuples throughout: the per-row layouts are cached by selection.
        dims = tuple(
            None if dim is None else tuple((start, stop, step) for start, stop, step in dim)
            for dim in selection
        )
    if any(dim_length(dim, size) == 0 for dim, size in zip(dims, shape, strict=True)):
        return
    yield from _level(
        dims, shape=tuple(shape), itemsize=itemsize, page=page, block=block, offset=0, at=(), top=True
    )


def _level(
    dims: tuple[DimSelection, ...],
    *,
    shape: tuple[int, ...],
    itemsize: int,
    page: int,
    block: int,
    offset: int,
    at: tuple[int, ...],
    top: bool,
) -> Iterator[RowRead]:
    row = itemsize * prod(shape[1:])
    inner = dims[1:]
    dense = _dense_span(inner, shape=shape[1:], itemsize=itemsize)
    exact = top and dense == (0, row)

    runs: tuple[Run, ...] = ((0, shape[0], 1),) if dims[0] is None else dims[0]
    # The tensor's rows that a strided run skips are never read, so the selected rows whole bound what is read.
    # One dim down, the sub-rows a strided run skips lie inside a selected row and are read across like gaps,
    # unless another run's sub-rows lie among them: those would be read twice.
    across = not top and not _interleaved(runs)

    def reads(start: int, stop: int, step: int, position: int) -> Iterator[RowRead]:
        count = len(range(start, stop, step))
        join = step == 1 or across
        # Rows shorter than two pages are read a block at a time: a read per row would skip at most one page.
        block_read = step == 1 and row < 2 * page
        if dense is not None:
            lo, hi = dense
            gap = step * row - (hi - lo)
            if gap == 0:
                yield RowRead(
                    offset + start * row, ((0, count * row),), at, (position, position + count), None
                )
                return
            if exact or row > block or not (block_read or (join and gap < page)):
                for first in range(0, count, _DIRECT_ROWS):
                    rows = min(_DIRECT_ROWS, count - first)
                    base = offset + (start + first * step) * row + lo
                    spans = tuple((j * step * row, j * step * row + hi - lo) for j in range(rows))
                    yield RowRead(base, spans, at, (position + first, position + first + rows), None)
                return
        if row > block:
            for j, index in enumerate(range(start, stop, step)):
                yield from _level(
                    inner,
                    shape=shape[1:],
                    itemsize=itemsize,
                    page=page,
                    block=block,
                    offset=offset + index * row,
                    at=(*at, position + j),
                    top=False,
                )
            return
        row_spans = _row_spans(inner, shape=shape[1:], itemsize=itemsize, page=page)
        per = max(1, (block // row - 1) // step + 1)
        for first in range(0, count, per):
            rows = min(per, count - first)
            spanned = (rows - 1) * step + 1
            yield RowRead(
                offset + (start + first * step) * row,
                ((row_spans[0][0], (rows - 1) * row + row_spans[-1][1]),)
                if block_read
                else _repeat(row_spans, runs=((0, spanned, step),), period=row, page=page, join=join),
                at,
                (position + first, position + first + rows),
                ((spanned, *shape[1:]), (((0, spanned, step),), *inner)),
            )

    if not top and _repeats(runs):
        # A sub-row that a selection repeats is read once and copied: what a row's reads pull stays within it.
        seen: dict[int, int] = {}
        for position, index in enumerate(dim_indices(runs, shape[0])):
            if index in seen:
                yield RowRead(0, (), at, (position, position + 1), None, seen[index])
            else:
                seen[index] = position
                yield from reads(index, index + 1, 1, position)
        return
    position = 0
    for start, stop, step in runs:
        count = len(range(start, stop, step))
        if count:
            yield from reads(start, stop, step, position)
            position += count


@lru_cache(maxsize=256)
def _repeats(runs: tuple[Run, ...]) -> bool:
    """Whether runs keep an index more than once."""
    if len(runs) < 2:
        return False
    indices = [index for run in runs for index in range(*run)]
    return len(set(indices)) < len(indices)


@lru_cache(maxsize=256)
def _interleaved(runs: tuple[Run, ...]) -> bool:
    """Whether the index ranges of two runs overlap."""
    ranges = sorted(
        (start, start + (len(range(start, stop, step)) - 1) * step)
        for start, stop, step in runs
        if start < stop
    )
    return any(later[0] <= earlier[1] for earlier, later in pairwise(ranges))


def _contiguous(dim: DimSelection, *, size: int) -> Span | None:
    """`(start, stop)` where a dim keeps the indices start..stop-1 in order, else None."""
    if dim is None:
        return (0, size)
    bounds: Span | None = None
    for start, stop, step in dim:
        count = len(range(start, stop, step))
        if count == 0:
            continue
        if count > 1 and step != 1:
            return None
        if bounds is None:
            bounds = (start, start + count)
        elif start == bounds[1]:
            bounds = (bounds[0], start + count)
        else:
            return None
    return bounds or (0, 0)


@lru_cache(maxsize=256)
def _dense_span(dims: tuple[DimSelection, ...], *, shape: tuple[int, ...], itemsize: int) -> Span | None:
    """The byte span of a row holding exactly its owned elements in stored order, else None."""
    start, count, ranged = 0, 1, False
    for dim, size in zip(dims, shape, strict=True):
        bounds = _contiguous(dim, size=size)
        if bounds is None or (ranged and bounds != (0, size)):
            return None
        lo, hi = bounds
        ranged = ranged or hi - lo != 1
        start, count = start * size + lo, count * (hi - lo)
    return (start * itemsize, (start + count) * itemsize)


@lru_cache(maxsize=64)
def _row_spans(
    dims: tuple[DimSelection, ...], *, shape: tuple[int, ...], itemsize: int, page: int
) -> tuple[Span, ...]:
    """The byte spans of a row that hold its owned elements, merged where less than `page` apart."""
    spans: tuple[Span, ...] = ((0, itemsize),)
    period = itemsize
    for dim, size in zip(reversed(dims), reversed(shape), strict=True):
        spans = _repeat(
            spans, runs=((0, size, 1),) if dim is None else dim, period=period, page=page, join=True
        )
        period *= size
    return spans


def _repeat(
    spans: tuple[Span, ...], *, runs: tuple[Run, ...], period: int, page: int, join: bool
) -> tuple[Span, ...]:
    """`spans` copied to `i * period` for every index i of `runs`; with `join`, merged where less than `page`
    apart (else each copy is kept apart)."""
    first, last = spans[0][0], spans[-1][1]
    out: list[Span] = []
    for start, stop, step in runs:
        count = len(range(start, stop, step))
        if count == 0:
            continue
        if join and len(spans) == 1 and step * period - (last - first) < page:
            out.append((start * period + first, (start + (count - 1) * step) * period + last))
            continue
        for index in range(start, stop, step):
            base = index * period
            out.extend((base + lo, base + hi) for lo, hi in spans)
    if not join or not out:
        return tuple(out)
    out.sort()
    merged = [out[0]]
    for lo, hi in out[1:]:
        if lo - merged[-1][1] < page:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return tuple(merged)
