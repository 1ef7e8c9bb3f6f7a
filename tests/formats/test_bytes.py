"""What a read pulls from storage: nothing to list, the owned bytes for leading-dim selections, owned spans
for column selections, and only the files that hold the keys read."""

from __future__ import annotations

from math import prod
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ownership.formats import open_checkpoint
from ownership.placement.selection import Selection, selection_shape
from tests.formats.builders import save_safetensors, save_sharded, save_torch

# Rows of 4 KiB, so that a row-granular reader and an element-granular one disagree visibly.
TENSORS = {
    "experts.w1": torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(0)),
    "lora_B": torch.randn(64, 4 * 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "bias": torch.arange(8, dtype=torch.int64),
}


def _owned(key: str, selection: Selection) -> int:
    tensor = TENSORS[key]
    return prod(selection_shape(selection, tensor.shape)) * tensor.element_size()


@pytest.fixture(params=["safetensors", "safetensors-sharded", "torch"])
def path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    if request.param == "safetensors":
        return save_safetensors(tmp_path / "model.safetensors", tensors=TENSORS)
    if request.param == "torch":
        return save_torch(tmp_path / "model.bin", tensors=TENSORS)
    return save_sharded(
        tmp_path, shards=[{"experts.w1": TENSORS["experts.w1"]}, {k: TENSORS[k] for k in ["lora_B", "bias"]}]
    )


def test_listing_reads_no_tensor_data(path: Path) -> None:
    with open_checkpoint(path) as checkpoint:
        assert sorted(e.key for e in checkpoint.entries()) == sorted(TENSORS)
        assert checkpoint.stats.bytes_read == 0
        assert checkpoint.stats.files_opened == set()


LEADING: list[Selection] = [
    None,
    (((2, 5, 1),), None, None),
    (((0, 8, 3),), None, None),
    (((6, 8, 1), (0, 2, 1)), None, None),
    (((3, 3, 1),), None, None),
]


@pytest.mark.parametrize("selection", LEADING)
def test_leading_dim_selection_reads_exactly_the_owned_bytes(path: Path, selection: Selection) -> None:
    with open_checkpoint(path) as checkpoint:
        checkpoint.read("experts.w1", selection)
        assert checkpoint.stats.bytes_read == _owned("experts.w1", selection)


@settings(max_examples=40, deadline=None)
@given(
    runs=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.integers(1, 3)), min_size=1, max_size=4)
)
def test_any_leading_dim_runs_read_the_owned_bytes(
    tmp_path_factory: pytest.TempPathFactory, runs: list[tuple[int, int, int]]
) -> None:
    path = tmp_path_factory.getbasetemp() / "leading.safetensors"
    if not path.exists():
        save_safetensors(path, tensors=TENSORS)
    selection: Selection = (tuple((min(a, b), max(a, b), step) for a, b, step in runs), None, None)
    with open_checkpoint(path) as checkpoint:
        checkpoint.read("experts.w1", selection)
        assert checkpoint.stats.bytes_read == _owned("experts.w1", selection)


def test_strided_columns_of_short_rows_read_as_one_span(path: Path) -> None:
    """PEFT's fused lora_B `[out, r*E]`: an expert's columns are strided, and rows of 64 bytes are less than a
    page apart, so the read is one span from the first owned byte to the last (the rows' ends outside it)."""
    num_experts = 8
    columns = tuple((e, 4 * num_experts, num_experts) for e in (2, 3))
    row = 4 * num_experts * 2
    first, last = 2 * 2, (3 * num_experts + 3 + 1) * 2  # bytes of column 2 and past column 27 in a row
    with open_checkpoint(path) as checkpoint:
        got = checkpoint.read("lora_B", (None, columns))
        assert got.shape == (64, 8)
        assert checkpoint.stats.bytes_read == 63 * row + last - first
        checkpoint.read("lora_B", (((10, 20, 1),), columns))
        assert checkpoint.stats.bytes_read == 63 * row + last - first + 9 * row + last - first


def test_stats_are_running_totals(path: Path) -> None:
    with open_checkpoint(path) as checkpoint:
        checkpoint.read("bias", (((0, 4, 1),),))
        checkpoint.read("bias", (((4, 8, 1),),))
        checkpoint.read("experts.w1", (((1, 2, 1),), None, None))
        assert checkpoint.stats.bytes_read == 8 * 8 + 16 * 64 * 4


def test_sharded_read_opens_only_the_shard_holding_the_key(tmp_path: Path) -> None:
    index = save_sharded(
        tmp_path,
        shards=[
            {"experts.w1": TENSORS["experts.w1"]},
            {"lora_B": TENSORS["lora_B"]},
            {"bias": TENSORS["bias"]},
        ],
    )
    with open_checkpoint(index) as checkpoint:
        checkpoint.entries()
        checkpoint.read("bias")
        assert checkpoint.stats.files_opened == {str(tmp_path / "model-00003-of-00003.safetensors")}
        checkpoint.read("bias", (((1, 2, 1),),))
        checkpoint.read("lora_B", (((0, 1, 1),), None))
        assert {Path(p).name for p in checkpoint.stats.files_opened} == {
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
        }
        assert checkpoint.stats.bytes_read == 8 * 8 + 8 + 4 * 8 * 2


def test_sharded_read_without_listing_first(tmp_path: Path) -> None:
    index = save_sharded(tmp_path, shards=[{"experts.w1": TENSORS["experts.w1"]}, {"bias": TENSORS["bias"]}])
    with open_checkpoint(index) as checkpoint:
        assert torch.equal(checkpoint.read("bias"), TENSORS["bias"])
        assert {Path(p).name for p in checkpoint.stats.files_opened} == {"model-00002-of-00002.safetensors"}
