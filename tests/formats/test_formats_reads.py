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
from ownership.selection import DimSelection, Run, Selection
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
_SHARD_1 = ["scalar", "vector", "matrix", "experts.gate_up", "four_d", "half"]
BACKENDS = ["safetensors", "safetensors-sharded", "torch", "torch-sharded", "torch-legacy"]


def _write(backend: str, folder: Path) -> Path:
    first = {k: v for k, v in TENSORS.items() if k in _SHARD_1}
    second = {k: v for k, v in TENSORS.items() if k not in _SHARD_1}
    if backend == "safetensors":
        return save_safetensors(folder / "model.safetensors", TENSORS)
    if backend == "safetensors-sharded":
        return save_sharded(folder, [first, second])
    if backend == "torch":
        return save_torch(folder / "model.bin", TENSORS)
    if backend == "torch-sharded":
        return save_sharded(folder, [first, second], suffix="bin")
    return save_torch(folder / "legacy.pt", TENSORS, legacy=True)


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
def key_and_selection(draw: st.DrawFn) -> tuple[str, Selection]:
    key = draw(st.sampled_from(sorted(TENSORS)))
    shape = TENSORS[key].shape
    if draw(st.booleans()) and draw(st.booleans()):
        return key, None
    dims: list[DimSelection] = [draw(st.none() | _runs(size)) for size in shape]
    return key, tuple(dims)


def _check(checkpoint: Checkpoint, key: str, selection: Selection) -> None:
    got = checkpoint.read(key, selection)
    want = reference(TENSORS[key], selection)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) if got.dim() else torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=120, deadline=None)
@given(case=key_and_selection())
def test_read_is_the_advanced_index(
    checkpoints: dict[str, Checkpoint], backend: str, case: tuple[str, Selection]
) -> None:
    key, selection = case
    _check(checkpoints[backend], key, selection)


# Shapes of selection the loader produces, pinned so a regression names its case.
CASES: list[tuple[str, str, Selection]] = [
    ("whole", "matrix", None),
    ("all dims None", "matrix", (None, None)),
    ("leading rows", "matrix", (((2, 6, 1),), None)),
    ("leading rows, strided", "matrix", (((1, 9, 3),), None)),
    ("rows out of order", "matrix", (((6, 9, 1), (0, 2, 1)), None)),
    ("repeated rows", "matrix", (((1, 3, 1), (1, 3, 1)), None)),
    ("empty run", "matrix", (((4, 4, 1),), None)),
    ("columns", "matrix", (None, ((2, 5, 1),))),
    # PEFT fused lora_B [out, r*E]: expert e's columns are e, e+E, e+2E ... (here E=4, r=3, experts 1 and 2).
    ("lora_B expert columns", "half", (None, ((1, 12, 4), (2, 12, 4)))),
    ("rows and columns", "matrix", (((1, 8, 2),), ((0, 2, 1), (5, 7, 1)))),
    ("tp half of gate_up", "experts.gate_up", (((1, 3, 1),), ((0, 3, 1), (3, 6, 1)), None)),
    ("last dim only", "experts.gate_up", (None, None, ((1, 4, 2),))),
    ("every dim", "four_d", (((2, 3, 1),), ((0, 4, 3),), ((1, 2, 1),), ((0, 5, 2), (1, 2, 1)))),
    ("scalar", "scalar", ()),
    ("vector strided", "vector", (((10, 11, 1), (0, 11, 5)),)),
    ("bool rows", "mask", (((1, 2, 1),), ((0, 7, 3),))),
    ("fp8 rows", "fp8", (((0, 6, 2),), None)),
    ("no rows of an empty tensor", "empty_rows", (((0, 0, 1),), ((1, 3, 1),))),
    ("empty columns", "empty_cols", (((0, 3, 2),), None)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "key", "selection"), CASES, ids=[c[0] for c in CASES])
def test_selection_shapes(
    checkpoints: dict[str, Checkpoint], backend: str, name: str, key: str, selection: Selection
) -> None:
    _check(checkpoints[backend], key, selection)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_are_fresh_tensors(checkpoints: dict[str, Checkpoint], backend: str) -> None:
    checkpoint = checkpoints[backend]
    first = checkpoint.read("matrix", (((0, 2, 1),), None))
    first.fill_(0)
    again = checkpoint.read("matrix", (((0, 2, 1),), None))
    assert torch.equal(again, TENSORS["matrix"][0:2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_describe_the_tensors(checkpoints: dict[str, Checkpoint], backend: str) -> None:
    names = {
        torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16", torch.int16: "I16",
        torch.float16: "F16", torch.bool: "BOOL", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3",
        torch.float64: "F64", torch.int32: "I32",
    }  # fmt: skip
    entries = {e.key: e for e in checkpoints[backend].entries()}
    assert entries.keys() == TENSORS.keys()
    for key, tensor in TENSORS.items():
        entry = entries[key]
        assert (entry.dtype, entry.shape) == (names[tensor.dtype], tuple(tensor.shape)), key
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        assert entry.itemsize == tensor.element_size()
