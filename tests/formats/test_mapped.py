"""Tensors handed out as copy-on-write views of the file's pages: the same values as a copy, their own storage
each, never a write back to the file, and never a page past the end of the file."""

from __future__ import annotations

import ctypes
import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ownership.formats.mapped as mapping
from ownership import load_ruleset
from ownership.errors import CheckpointError
from ownership.formats import open_checkpoint
from ownership.loading.loader import load
from tests.formats.builders import save_safetensors, save_torch

TENSORS = {
    **{f"layers.{i}.w": torch.randn(64, 96, generator=torch.Generator().manual_seed(i)) for i in range(6)},
    "layers.0.scale": torch.tensor(3.5),
    "layers.0.bias": torch.arange(7, dtype=torch.int64),
    "layers.0.half": torch.randn(5, 3).to(torch.bfloat16),
}
ROWS = (((8, 40, 1),), None)


@pytest.fixture
def map_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapping, "MAP_MIN_BYTES", 1)


def _saved(tmp_path: Path, suffix: str) -> Path:
    save = save_safetensors if suffix == "safetensors" else save_torch
    return save(tmp_path / f"w.{suffix}", tensors=TENSORS)


def _is_mapped(tensor: torch.Tensor) -> bool:
    # Views of a mapping cannot grow their storage; memory of its own can.
    return not tensor.untyped_storage().resizable()


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.usefixtures("map_everything")
def test_mapped_tensors_are_the_tensors(tmp_path: Path, suffix: str) -> None:
    path = _saved(tmp_path, suffix)
    before = path.read_bytes()
    with open_checkpoint(path) as checkpoint:
        whole = checkpoint.read_many([(key, None) for key in TENSORS])
        rows_ = checkpoint.read_many([(key, ROWS) for key in list(TENSORS)[:6]])
        owned = sum(t.numel() * t.element_size() for t in TENSORS.values()) + 6 * 32 * 96 * 4
        assert checkpoint.stats.bytes_read == owned
    assert all(_is_mapped(t) for t in whole + rows_)
    for got, key in zip(whole, TENSORS, strict=True):
        assert got.dtype == TENSORS[key].dtype and torch.equal(got, TENSORS[key])
        # Each has a storage of its own bytes: safetensors will save them, and torch.save saves no more.
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()
    assert all(torch.equal(got, TENSORS[key][8:40]) for got, key in zip(rows_, TENSORS, strict=False))
    # Writes stay in this process: the file is unchanged.
    whole[0].mul_(0).add_(1)
    assert torch.equal(whole[0], torch.ones(64, 96)) and path.read_bytes() == before
    save_file(dict(zip(TENSORS, whole, strict=True)), str(tmp_path / "out.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["layers.1.w"], TENSORS["layers.1.w"])


def test_small_regions_and_mmap_false_are_copies(tmp_path: Path) -> None:
    path = _saved(tmp_path, "safetensors")
    with open_checkpoint(path) as checkpoint:
        # 24 KiB a tensor, 160 KiB in all: under MAP_MIN_BYTES.
        assert not any(_is_mapped(t) for t in checkpoint.read_many([(key, None) for key in TENSORS]))
    big = {f"e.{i}": torch.randn(512, 256) for i in range(4)}  # 2 MiB
    path = save_safetensors(tmp_path / "big.safetensors", tensors=big)
    with open_checkpoint(path) as checkpoint:
        assert all(_is_mapped(t) for t in checkpoint.read_many([(key, None) for key in big]))
    with open_checkpoint(path, mmap=False) as checkpoint:
        copies = checkpoint.read_many([(key, None) for key in big])
    assert not any(_is_mapped(t) for t in copies)
    assert all(torch.equal(got, big[key]) for got, key in zip(copies, big, strict=True))


@pytest.mark.usefixtures("map_everything")
def test_load_maps_unless_told_not_to(tmp_path: Path) -> None:
    tensors = {f"m.layers.0.mlp.experts.{e}.w1.lora_A.weight": torch.randn(16, 64) for e in range(4)}
    path = save_safetensors(tmp_path / "adapter.safetensors", tensors=tensors)
    ruleset = load_ruleset("vllm-ep-lora")
    for mapped in (True, False):
        result = load(ruleset, path, mesh="ep=2", rank=1, params={"num_experts": 4}, mmap=mapped)
        assert sorted(result.tensors) == sorted(tensors)[2:]
        assert all(torch.equal(t, tensors[key]) for key, t in result.tensors.items())
        assert all(_is_mapped(t) == mapped for t in result.tensors.values())


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.usefixtures("map_everything")
def test_a_file_cut_short_is_an_error_not_a_crash(tmp_path: Path, suffix: str) -> None:
    path = _saved(tmp_path, suffix)
    with open_checkpoint(path) as checkpoint:
        entries = checkpoint.entries()
        # Cut inside the last tensor's bytes, after the header was read: a mapped page past the end would be
        # a SIGBUS when touched.
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size - 2000)
        with pytest.raises(CheckpointError) as caught:
            checkpoint.read_many([(entry.key, None) for entry in entries])
    message = str(caught.value)
    assert message.startswith(f"{path}: file ends inside a tensor"), message
    assert "re-download or re-save the file" in message


@pytest.mark.usefixtures("map_everything")
def test_pages_are_touched_where_the_kernel_cannot_populate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def unsupported(address: int, length: int, advice: int) -> int:
        calls.append(advice)
        ctypes.set_errno(errno.EINVAL)  # as a kernel before 5.14 answers
        return -1

    monkeypatch.setattr(mapping, "_madvise", unsupported)
    path = _saved(tmp_path, "bin")
    with open_checkpoint(path) as checkpoint:
        out = checkpoint.read_many([(key, None) for key in TENSORS])
    assert calls and all(torch.equal(got, TENSORS[key]) for got, key in zip(out, TENSORS, strict=True))


@pytest.mark.usefixtures("map_everything")
def test_pages_gone_from_the_file_are_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cut_short(address: int, length: int, advice: int) -> int:
        ctypes.set_errno(errno.EFAULT)  # what the kernel answers for pages past the end of the file
        return -1

    monkeypatch.setattr(mapping, "_madvise", cut_short)
    path = _saved(tmp_path, "safetensors")
    with open_checkpoint(path) as checkpoint, pytest.raises(CheckpointError) as caught:
        checkpoint.read_many([(key, None) for key in TENSORS])
    assert str(caught.value) == (
        f"{path}: cannot read the file's pages: found Bad address, expected the whole file, as long as when it "
        "was opened. Fix: do not rewrite the file while it is read; re-download it if storage fails"
    )


@pytest.mark.usefixtures("map_everything")
def test_a_tensor_off_its_alignment_is_copied(tmp_path: Path) -> None:
    # Three bytes ahead of it put the float32 tensor at an odd offset, where a view would be misaligned.
    values = torch.arange(1024, dtype=torch.float32)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [1024], "data_offsets": [3, 3 + 4096]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\x01\x02\x03" + values.numpy().tobytes())
    with open_checkpoint(path) as checkpoint:
        small, odd = checkpoint.read_many([("a", None), ("b", None)])
    assert small.tolist() == [1, 2, 3] and torch.equal(odd, values)
    assert _is_mapped(small) and not _is_mapped(odd)
