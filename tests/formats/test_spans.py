"""Selections that cut inner dims read only the byte spans of each row that hold owned elements.

The expectations are computed here from element offsets, independently of `row_reads`: what is read lies
between the owned bytes (each distinct owned byte at least once) and the owned bytes merged wherever less than
two pages apart within the rows of one first-dim run (a strided run's rows apart: those it skips are never
read), which is itself never more than the selected rows whole. Gaps under a page are read across, and so are
gaps inside a block of consecutive rows shorter than two pages; where neither holds, exactly the owned bytes. Small `page` and `block` values make tensors of a few hundred bytes take every path
that megabyte tensors take: direct spans, staged windows, rows larger than the staging bound.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from math import prod
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ownership import CheckpointError
from ownership.formats import open_checkpoint
from ownership.formats.base import ReadStats
from ownership.formats.pread import RowReader
from ownership.formats.spans import (
    BLOCK_BYTES,
    PAGE_BYTES,
    row_reads,
    selection_read_bytes,
    selection_read_count,
)
from ownership.placement.selection import DimSelection, Run, Selection, selection_shape
from tests.formats.builders import reference, save_safetensors

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int64,
    torch.bool,
    torch.float8_e4m3fn,
]


def _random(shape: tuple[int, ...], *, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes viewed as `dtype` (NaNs included: results are compared as bytes)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (prod(shape) * itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _read(
    tensor: torch.Tensor,
    *,
    selection: Selection,
    page: int = PAGE_BYTES,
    block: int = BLOCK_BYTES,
    pad: int = 0,
) -> tuple[torch.Tensor, int]:
    """`selection` of `tensor` read back from a file holding its bytes after `pad` bytes, and the bytes read."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "raw"
        data = tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        path.write_bytes(b"\xee" * pad + data + b"\xee" * 7)
        reader = RowReader(path, stats=ReadStats(), display="raw", page=page, block=block)
        try:
            got = reader.read(pad, tensor.dtype, tuple(tensor.shape), selection)
        finally:
            reader.close()
    return got, reader.stats.bytes_read


def _same(got: torch.Tensor, *, want: torch.Tensor) -> bool:
    if (got.dtype, got.shape) != (want.dtype, want.shape) or not got.is_contiguous():
        return False
    return torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def _owned_offsets(shape: tuple[int, ...], *, selection: Selection) -> list[int]:
    """Flat element offsets of the owned elements, in result order (repeats kept)."""
    flat = torch.arange(prod(shape), dtype=torch.int64).reshape(shape)
    return [int(i) for i in reference(flat, selection=selection).reshape(-1).tolist()]


def _merged(offsets: list[int], *, itemsize: int, gap: int) -> int:
    """Bytes of the distinct elements at `offsets`, with every gap shorter than `gap` filled."""
    total, span = 0, None
    for offset in sorted(set(offsets)):
        lo, hi = offset * itemsize, (offset + 1) * itemsize
        if span is not None and lo - span[1] < gap:
            span = (span[0], hi)
            continue
        total += span[1] - span[0] if span else 0
        span = (lo, hi)
    return total + (span[1] - span[0] if span else 0)


def _bounds(shape: tuple[int, ...], *, selection: Selection, itemsize: int, page: int) -> tuple[int, int]:
    """(distinct owned bytes, owned bytes merged across gaps under two pages within each first-dim run)."""
    distinct = len(set(_owned_offsets(shape, selection=selection))) * itemsize
    if not shape:
        return distinct, itemsize
    dims: tuple[DimSelection, ...] = (None,) * len(shape) if selection is None else selection
    runs: tuple[Run, ...] = ((0, shape[0], 1),) if dims[0] is None else dims[0]
    merged = 0
    for start, stop, step in runs:
        rows = list(range(start, stop, step))
        groups = [rows] if step == 1 else [[row] for row in rows]
        for group in groups:
            if group:
                part = (((group[0], group[-1] + 1, 1),), *dims[1:])
                merged += _merged(_owned_offsets(shape, selection=part), itemsize=itemsize, gap=2 * page)
    return distinct, merged


def _runs(size: int) -> st.SearchStrategy[tuple[Run, ...]]:
    """1-3 runs over a dim of `size`, in any order, overlapping or empty ones included."""
    run = st.tuples(st.integers(0, size), st.integers(0, size), st.integers(1, 4)).map(
        lambda t: (min(t[0], t[1]), max(t[0], t[1]), t[2])
    )
    return st.lists(run, min_size=1, max_size=3).map(tuple)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[tuple[int, ...], torch.dtype, Selection]:
    ndim = draw(st.integers(1, 4))
    shape = (*(draw(st.integers(0, 6)) for _ in range(ndim - 1)), draw(st.integers(0, 40)))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.integers(0, 9)) == 0:
        return shape, dtype, None
    selection = tuple(draw(st.none() | _runs(size)) for size in shape)
    return shape, dtype, selection


@settings(max_examples=400, deadline=None)
@given(
    case=_cases(),
    page=st.sampled_from([1, 8, 64, PAGE_BYTES]),
    block=st.sampled_from([1, 24, 256, BLOCK_BYTES]),
    pad=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_any_selection_reads_its_elements_and_only_owned_spans(
    case: tuple[tuple[int, ...], torch.dtype, Selection], page: int, block: int, pad: int, seed: int
) -> None:
    shape, dtype, selection = case
    tensor = _random(shape, dtype=dtype, seed=seed)
    itemsize = tensor.element_size()
    got, read = _read(tensor, selection=selection, page=page, block=block, pad=pad)
    assert _same(got, want=reference(tensor, selection=selection))
    assert read == selection_read_bytes(selection, shape=shape, itemsize=itemsize, page=page, block=block)
    distinct, merged = _bounds(shape, selection=selection, itemsize=itemsize, page=page)
    assert distinct <= read <= merged <= selection_read_count(selection, shape) * itemsize
    if selection is None or all(dim is None for dim in selection[1:]):
        assert read == prod(selection_shape(selection, shape)) * itemsize


@settings(max_examples=200, deadline=None)
@given(case=_cases(), page=st.sampled_from([1, 8, 64]), block=st.sampled_from([1, 24, 256]))
def test_reads_stay_within_their_windows(
    case: tuple[tuple[int, ...], torch.dtype, Selection], page: int, block: int
) -> None:
    """Staged windows fit the staging bound and hold their spans; direct spans fill their rows exactly; a
    repeated sub-row is copied from one read before."""
    shape, dtype, selection = case
    if not shape:
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    local = selection_shape(selection, shape)
    for read in row_reads(selection, shape=shape, itemsize=itemsize, page=page, block=block):
        spans = read.spans
        assert all(lo < hi for lo, hi in spans)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
        rows = read.rows[1] - read.rows[0]
        if read.copy_from is not None:
            assert (spans, rows, read.staged) == ((), 1, None) and read.copy_from < read.rows[0]
        elif read.staged is None:
            assert sum(hi - lo for lo, hi in spans) == rows * prod(local[len(read.at) + 1 :]) * itemsize
        else:
            window, _ = read.staged
            assert prod(window) * itemsize <= block
            assert spans[0][0] >= 0 and spans[-1][1] <= prod(window) * itemsize


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 4096),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    data=st.data(),
)
def test_column_ranges_of_wide_rows_read_exactly_the_owned_bytes(
    rows: int, width: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    """A tp rank's columns of a row-parallel weight: where the rest of a row is at least a page and rows are
    two pages or more, the owned bytes and no others."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    columns = data.draw(st.integers(1, width), label="columns")
    start = data.draw(st.integers(0, width - columns), label="start")
    row_runs = data.draw(st.none() | _runs(rows), label="rows")
    selection: Selection = (row_runs, ((start, start + columns, 1),))
    tensor = _random((rows, width), dtype=dtype, seed=width)
    got, read = _read(tensor, selection=selection)
    assert _same(got, want=reference(tensor, selection=selection))
    owned = prod(selection_shape(selection, tensor.shape)) * itemsize
    if (width - columns) * itemsize >= PAGE_BYTES and width * itemsize >= 2 * PAGE_BYTES:
        assert read == owned
    else:
        assert owned <= read <= selection_read_count(selection, tensor.shape) * itemsize


def test_columns_of_a_wide_matrix_read_exactly_the_owned_bytes(tmp_path: Path) -> None:
    """`[64, 8192]` float32 keeping columns 0:1024: 64 spans of 4 KiB, not 64 rows of 32 KiB."""
    tensor = torch.randn(64, 8192, generator=torch.Generator().manual_seed(0))
    path = save_safetensors(tmp_path / "model.safetensors", tensors={"o_proj": tensor})
    selection: Selection = (None, ((0, 1024, 1),))
    with open_checkpoint(path) as checkpoint:
        got = checkpoint.read("o_proj", selection)
        assert torch.equal(got, tensor[:, :1024])
        assert checkpoint.stats.bytes_read == 64 * 1024 * 4 == 262_144
    assert selection_read_count(selection, tensor.shape) * 4 == 2_097_152


@pytest.mark.parametrize("block", [BLOCK_BYTES, 4096])
def test_tp_columns_of_stacked_experts_read_exactly_the_owned_bytes(block: int) -> None:
    """`[E, out, in]` experts, a tp rank's columns of every row: one span per row, also when an expert is
    larger than the staging bound."""
    tensor = _random((4, 16, 2048), dtype=torch.float32, seed=1)
    for rank in range(4):
        selection: Selection = (((1, 4, 2),), None, ((rank * 512, (rank + 1) * 512, 1),))
        got, read = _read(tensor, selection=selection, block=block)
        assert _same(got, want=tensor[1:4:2, :, rank * 512 : (rank + 1) * 512].contiguous())
        assert read == 2 * 16 * 512 * 4


def test_strided_columns_of_a_short_row_are_one_span() -> None:
    """Columns `0:24:6` of rows of 96 bytes, rows less than a page apart: one read from the first owned byte to
    the last."""
    tensor = _random((10, 24), dtype=torch.float32, seed=2)
    selection: Selection = (None, ((0, 24, 6),))
    reads = list(row_reads(selection, shape=tensor.shape, itemsize=4))
    assert [read.spans for read in reads] == [((0, 9 * 96 + 18 * 4 + 4),)]
    got, read = _read(tensor, selection=selection)
    assert _same(got, want=tensor[:, 0:24:6].contiguous())
    assert read == 9 * 96 + 76


def test_consecutive_rows_under_two_pages_are_read_as_a_block() -> None:
    """Rows of 5632 bytes keeping 1408 of them: a read per row would skip at most one page of each gap, so a
    step-1 run is one read from the first owned byte to the last; a strided run reads each row's span alone."""
    tensor = _random((20, 1408), dtype=torch.float32, seed=5)
    columns = ((352, 704, 1),)
    got, read = _read(tensor, selection=(None, columns))
    assert _same(got, want=tensor[:, 352:704].contiguous())
    assert read == 19 * 1408 * 4 + 352 * 4
    got, read = _read(tensor, selection=(((0, 20, 2),), columns))
    assert _same(got, want=tensor[0:20:2, 352:704].contiguous())
    assert read == 10 * 352 * 4


def test_rows_a_strided_run_skips_are_never_read() -> None:
    tensor = _random((10, 24), dtype=torch.float32, seed=3)
    selection: Selection = (((0, 10, 3),), ((0, 24, 6),))
    got, read = _read(tensor, selection=selection)
    assert _same(got, want=tensor[0:10:3, 0:24:6].contiguous())
    assert read == 4 * 76


def test_threads_share_a_reader() -> None:
    """Staging is per thread: concurrent staged reads of one reader stay correct, and every byte is counted."""
    tensor = _random((64, 300), dtype=torch.int16, seed=4)
    selections: list[Selection] = [
        (((i % 7, 64, 1 + i % 3),), ((i % 5, 300, 3 + i % 4), (i % 11, i % 11 + 40, 1))) for i in range(48)
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "raw"
        path.write_bytes(tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
        reader = RowReader(path, stats=ReadStats(), display="raw", page=64, block=2048)

        def read(selection: Selection) -> torch.Tensor:
            return reader.read(0, torch.int16, (64, 300), selection)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(read, selections))
        reader.close()
    for selection, got in zip(selections, results, strict=True):
        assert _same(got, want=reference(tensor, selection=selection))
    expected = sum(
        selection_read_bytes(s, shape=(64, 300), itemsize=2, page=64, block=2048) for s in selections
    )
    assert reader.stats.bytes_read == expected


def test_a_span_past_the_end_of_the_file_is_an_error(tmp_path: Path) -> None:
    tensor = _random((4, 2048), dtype=torch.float32, seed=6)
    path = tmp_path / "raw"
    path.write_bytes(tensor.view(torch.uint8).reshape(-1).numpy().tobytes()[: 3 * 8192 + 100])
    reader = RowReader(path, stats=ReadStats(), display="raw")
    with pytest.raises(
        CheckpointError, match=r"^raw: file ends inside a tensor: found end of file after 100 of 400 "
    ):
        reader.read(0, torch.float32, (4, 2048), (None, ((0, 100, 1),)))
    reader.close()
