"""Every back-end returns exactly `tensor[index]` for every selection shape, as a fresh contiguous tensor."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ownership.formats import Checkpoint, WholeFileReadWarning, open_checkpoint
from ownership.placement.selection import DimSelection, Run, Selection
from tests.formats.builders import reference, save_safetensors, save_sharded, save_torch

TENSORS: dict[str, torch.Tensor] = {
    "scalar": torch.tensor(3.5),
    "vector": torch.arange(11, dtype=torch.int64),
    "matrix": torch.randn(9, 7, generator=torch.Generator().manual_seed(0)),
    "experts.gate_up": torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "four_d": torch.arange(3 * 4 * 2 * 5, dtype=torch.int16).reshape(3, 4, 2, 5),
    "half": torch.randn(4, 12, generator=torch.Generator().manual_seed(2)).to(torch.float16),
    "mask": torch.arange(14).reshape(2, 7) % 3 == 0,
    "bytes": torch.arange(40, dtype=torch.uint8).reshape(8, 5),
    "fp8": torch.linspace(-2, 2, 24).reshape(6, 4).to(torch.float8_e4m3fn),
    "double": torch.randn(3, 3, generator=torch.Generator().manual_seed(3)).to(torch.float64),
    "empty_rows": torch.zeros(0, 4),
    "empty_cols": torch.zeros(3, 0, dtype=torch.int32),
}
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.int64: "I64",
    torch.bfloat16: "BF16",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float64: "F64",
    torch.int32: "I32",
}
BACKENDS = ["safetensors", "safetensors-sharded", "torch", "torch-sharded", "torch-legacy"]
_FIRST_SHARD = {"scalar", "vector", "matrix", "experts.gate_up", "four_d", "half"}
# torch's old pickle format saves float8 storages untyped, and torch.load cannot read them back.
_NOT_LEGACY = {"fp8"}


def keys_of(backend: str) -> list[str]:
    return sorted(k for k in TENSORS if backend != "torch-legacy" or k not in _NOT_LEGACY)


def _write(backend: str, folder: Path) -> Path:
    tensors = {k: TENSORS[k] for k in keys_of(backend)}
    first = {k: v for k, v in tensors.items() if k in _FIRST_SHARD}
    second = {k: v for k, v in tensors.items() if k not in _FIRST_SHARD}
    if backend == "safetensors":
        return save_safetensors(folder / "model.safetensors", tensors=tensors)
    if backend == "safetensors-sharded":
        return save_sharded(folder, shards=[first, second])
    if backend == "torch":
        return save_torch(folder / "model.bin", tensors=tensors)
    if backend == "torch-sharded":
        return save_sharded(folder, shards=[first, second], suffix="bin")
    return save_torch(folder / "legacy.pt", tensors=tensors, legacy=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Checkpoint]]:
    opened: dict[str, Checkpoint] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WholeFileReadWarning)
        for backend in BACKENDS:
            opened[backend] = open_checkpoint(_write(backend, tmp_path_factory.mktemp(backend)))
    yield opened
    for checkpoint in opened.values():
        checkpoint.close()


def _runs(size: int) -> st.SearchStrategy[tuple[Run, ...]]:
    run = st.tuples(st.integers(0, size), st.integers(0, size), st.integers(1, 4)).map(
        lambda t: (min(t[0], t[1]), max(t[0], t[1]), t[2])
    )
    return st.lists(run, min_size=1, max_size=3).map(tuple)


@st.composite
def key_and_selection(draw: st.DrawFn, keys: list[str]) -> tuple[str, Selection]:
    key = draw(st.sampled_from(keys))
    if draw(st.integers(0, 9)) == 0:
        return key, None
    dims: list[DimSelection] = [draw(st.none() | _runs(size)) for size in TENSORS[key].shape]
    return key, tuple(dims)


def check_read(checkpoint: Checkpoint, key: str, selection: Selection) -> None:
    got = checkpoint.read(key, selection)
    want = reference(TENSORS[key], selection=selection)
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert got.is_contiguous()
    # Compared as bytes: exact for every dtype, NaN and float8 included. (A size-1 dim may keep any stride.)
    flat = got.clone(memory_format=torch.contiguous_format).reshape(-1)
    assert torch.equal(flat.view(torch.uint8), want.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_read_is_the_advanced_index(
    checkpoints: dict[str, Checkpoint], backend: str, data: st.DataObject
) -> None:
    key, selection = data.draw(key_and_selection(keys_of(backend)), label="key, selection")
    check_read(checkpoints[backend], key, selection)


# The shapes of selection the loader produces, pinned so that a regression names its case.
CASES: list[tuple[str, str, Selection]] = [
    ("whole", "matrix", None),
    ("every dim whole", "matrix", (None, None)),
    ("leading rows", "matrix", (((2, 6, 1),), None)),
    ("leading rows strided", "matrix", (((1, 9, 3),), None)),
    ("rows out of order", "matrix", (((6, 9, 1), (0, 2, 1)), None)),
    ("repeated rows", "matrix", (((1, 3, 1), (1, 3, 1)), None)),
    ("empty run", "matrix", (((4, 4, 1),), None)),
    ("columns", "matrix", (None, ((2, 5, 1),))),
    # PEFT's fused lora_B [out, r*E]: expert e owns columns e, e+E, e+2E ... (E=4, r=3; experts 1 and 2).
    ("lora_B expert columns", "half", (None, ((1, 12, 4), (2, 12, 4)))),
    ("rows and columns", "matrix", (((1, 8, 2),), ((0, 2, 1), (5, 7, 1)))),
    ("tp share of packed gate_up", "experts.gate_up", (((1, 3, 1),), ((0, 3, 1), (3, 6, 1)), None)),
    ("last dim only", "experts.gate_up", (None, None, ((1, 4, 2),))),
    ("every dim", "four_d", (((2, 3, 1),), ((0, 4, 3),), ((1, 2, 1),), ((0, 5, 2), (1, 2, 1)))),
    ("scalar", "scalar", ()),
    ("vector runs", "vector", (((10, 11, 1), (0, 11, 5)),)),
    ("bool", "mask", (((1, 2, 1),), ((0, 7, 3),))),
    ("float8 rows", "fp8", (((0, 6, 2),), None)),
    ("empty tensor", "empty_rows", (((0, 0, 1),), ((1, 3, 1),))),
    ("empty columns", "empty_cols", (((0, 3, 2),), None)),
]


@pytest.mark.parametrize(
    ("backend", "key", "selection"),
    # Only the combinations a format can hold: the old pickle format cannot hold float8.
    [
        (backend, key, selection)
        for backend in BACKENDS
        for _, key, selection in CASES
        if key in keys_of(backend)
    ],
    ids=[f"{name}-{backend}" for backend in BACKENDS for name, key, _ in CASES if key in keys_of(backend)],
)
def test_selection_shapes(
    checkpoints: dict[str, Checkpoint], backend: str, key: str, selection: Selection
) -> None:
    check_read(checkpoints[backend], key, selection)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_are_fresh_tensors(checkpoints: dict[str, Checkpoint], backend: str) -> None:
    checkpoint = checkpoints[backend]
    for selection in [None, (((0, 2, 1),), None), (None, ((0, 7, 2),))]:
        checkpoint.read("matrix", selection).fill_(0)
        check_read(checkpoint, "matrix", selection)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_describe_the_tensors(checkpoints: dict[str, Checkpoint], backend: str) -> None:
    entries = {e.key: e for e in checkpoints[backend].entries()}
    assert sorted(entries) == keys_of(backend)
    for key in keys_of(backend):
        tensor, entry = TENSORS[key], entries[key]
        assert (entry.dtype, entry.shape) == (DTYPE_NAMES[tensor.dtype], tuple(tensor.shape)), key
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        assert entry.itemsize == tensor.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
def test_results_own_exactly_their_bytes(checkpoints: dict[str, Checkpoint], backend: str) -> None:
    for selection in [
        (((0, 1, 1), (2, 2, 1)), ((0, 1, 2),)),
        (((1, 2, 1),), ((1, 7, 7),)),
        (None, ((3, 4, 1),)),
    ]:
        got = checkpoints[backend].read("matrix", selection)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size(), selection
