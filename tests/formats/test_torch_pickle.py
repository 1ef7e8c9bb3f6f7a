"""The allow-listed pickle reading of `torch.save` files agrees with `torch.load`, and falls back where it must."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ownership.formats import TorchFile
from ownership.formats.torch_pickle import read_pickle

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_reads_match_torch_load(tmp_path: Path, dtype: torch.dtype) -> None:
    full = (torch.arange(60).reshape(5, 12) % 7).to(dtype)
    path = tmp_path / "w.bin"
    # A view into a shared storage exercises the storage offset.
    torch.save({"full": full, "tail": full[2:], "scalar": full[0, 0].clone()}, path)
    _assert_all_located(path)
    with TorchFile(path) as ckpt:
        assert all(ckpt.data_offset(entry.key) is not None for entry in ckpt.entries())
        assert torch.equal(ckpt.read("full"), full)
        assert torch.equal(ckpt.read("tail", (((1, 3, 1),), ((0, 12, 5),))), full[3:5, 0:12:5])
        assert torch.equal(ckpt.read("scalar"), full[0, 0])


def test_non_contiguous_tensors_fall_back_to_torch_load(tmp_path: Path) -> None:
    full = torch.arange(12.0).reshape(3, 4)
    path = tmp_path / "t.bin"
    torch.save({"t": full.t()}, path)
    state = read_pickle(path)
    assert state is not None and state.location("t") is None
    with TorchFile(path) as ckpt:
        assert ckpt.data_offset("t") is None
        assert torch.equal(ckpt.read("t", (((1, 3, 1),), None)), full.t()[1:3])


def test_fixture_bins_take_the_fast_path(fixtures: Path) -> None:
    for path in fixtures.rglob("*.bin"):
        _assert_all_located(path)


def _assert_all_located(path: Path) -> None:
    """Every tensor of the file is placed from its pickle, none left to torch.load."""
    state = read_pickle(path)
    assert state is not None, path
    assert all(state.location(key) is not None for key in state.tensors), path
