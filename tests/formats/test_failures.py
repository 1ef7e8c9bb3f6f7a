"""Every way a checkpoint can be wrong gets one `CheckpointError` naming the file (and key), at the earliest
moment: opening or listing for file-level problems, reading for key-level ones. Messages are pinned whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ownership.errors import CheckpointError
from ownership.formats import open_checkpoint
from ownership.placement.selection import Selection
from tests.formats.builders import save_safetensors, save_sharded, save_torch

_FIX_SAFETENSORS = "Fix: re-download or re-save the file"
_FIX_PLAN = "Fix: plan with the checkpoint's own shapes"


def listing_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info, open_checkpoint(path) as checkpoint:
        checkpoint.entries()
    return str(info.value)


def read_error(path: Path, key: str, selection: Selection = None) -> str:
    with open_checkpoint(path) as checkpoint:
        checkpoint.entries()
        with pytest.raises(CheckpointError) as info:
            checkpoint.read(key, selection)
    return str(info.value)


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


# Paths and folders.


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "nope")
    assert (
        str(info.value)
        == f"{tmp_path / 'nope'}: no such checkpoint: found no file or folder there. Fix: check the path"
    )


_LOOKED_FOR = (
    "expected adapter_config.json + adapter_model.{safetensors,bin}[.index.json], or one of "
    "model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin, or a single "
    ".safetensors/.bin/.pt file. Fix: point at the weight file or index directly"
)


def test_folder_without_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    assert listing_error(tmp_path) == (
        f"{tmp_path}: no checkpoint recognised in this folder: found no weight files, {_LOOKED_FOR}"
    )


def test_folder_with_two_weight_files_and_no_index(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "a.safetensors", tensors={"a": torch.zeros(1)})
    save_safetensors(tmp_path / "b.safetensors", tensors={"b": torch.zeros(1)})
    assert listing_error(tmp_path) == (
        f"{tmp_path}: no checkpoint recognised in this folder: found a.safetensors, b.safetensors, {_LOOKED_FOR}"
    )


def test_file_of_unknown_type(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    assert listing_error(path) == (
        f"{path}: unknown checkpoint file type: found .npz, expected .safetensors, .bin, .pt, .pth or *.index.json. "
        "Fix: rename the file to its format's suffix"
    )


# Safetensors files: every problem is found when the header is read, before any tensor.


def test_file_shorter_than_its_header_length(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert str(info.value) == (
        f"{path}: corrupt or truncated safetensors file: found 5 bytes, expected at least 8 bytes of header "
        f"length. {_FIX_SAFETENSORS}"
    )


def test_header_length_beyond_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    assert listing_error(path) == (
        f"{path}: corrupt or truncated safetensors file: found header length 1000000 in a file of 10 bytes, "
        f"expected a header that fits in the file (truncated download?). {_FIX_SAFETENSORS}"
    )


def test_truncated_data(tmp_path: Path) -> None:
    path = save_safetensors(tmp_path / "w.safetensors", tensors={"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert listing_error(path) == (
        f"{path}: key 'w': corrupt or truncated safetensors file: found data offsets [0, 16384] past the "
        f"{len(data) // 2 - header_end} data bytes, expected offsets inside the file (truncated file?). "
        f"{_FIX_SAFETENSORS}"
    )


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "w.safetensors", b"{{{{")
    assert listing_error(path).startswith(
        f"{path}: corrupt or truncated safetensors file: found a header that is not JSON (Expecting property name"
    )
    raw_safetensors(path, [1, 2])
    assert listing_error(path) == (
        f"{path}: corrupt or truncated safetensors file: found a header that is not a JSON object, expected a "
        f"JSON object. {_FIX_SAFETENSORS}"
    )


@pytest.mark.parametrize(
    "info",
    [
        {"dtype": "F32", "shape": [2]},
        {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        [1, 2, 3],
    ],
)
def test_malformed_header_entry(tmp_path: Path, info: object) -> None:
    path = raw_safetensors(tmp_path / "w.safetensors", {"w": info}, b"\0" * 4)
    message = listing_error(path)
    assert message.startswith(
        f"{path}: key 'w': corrupt or truncated safetensors file: found a malformed header entry {info!r}, "
        "expected dtype, shape and data_offsets"
    )
    assert message.endswith(_FIX_SAFETENSORS)


def test_byte_count_that_does_not_match_the_shape(tmp_path: Path) -> None:
    path = raw_safetensors(
        tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4
    )
    assert listing_error(path) == (
        f"{path}: key 'w': corrupt or truncated safetensors file: found 4 bytes for shape [2] of F32, expected 8 "
        f"bytes. {_FIX_SAFETENSORS}"
    )


def test_dtype_torch_cannot_hold(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}
    path = raw_safetensors(tmp_path / "w.safetensors", header, b"\0" * 3)
    assert listing_error(path).startswith(
        f"{path}: key 'w': dtype 'F6_E3M2' has no torch equivalent here: found F6_E3M2, expected one of F64, F32, "
    )


def test_empty_header_is_an_empty_checkpoint(tmp_path: Path) -> None:
    path = raw_safetensors(tmp_path / "w.safetensors", {"__metadata__": {"format": "pt"}})
    with open_checkpoint(path) as checkpoint:
        assert checkpoint.entries() == []


# Indexes.


def _two_shards(folder: Path, weight_map: dict[str, str]) -> Path:
    save_safetensors(folder / "a.safetensors", tensors={"a": torch.zeros(2), "c": torch.zeros(1)})
    save_safetensors(folder / "b.safetensors", tensors={"b": torch.ones(2), "c": torch.zeros(1)})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_that_is_not_json(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{nope")
    assert listing_error(index) == (
        f"{index}: cannot read the index: found Expecting property name enclosed in double quotes: line 1 column "
        "2 (char 1), expected a JSON object with a weight_map. Fix: re-download the index"
    )


def test_index_without_a_weight_map(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    assert listing_error(index) == (
        f"{index}: index has no weight_map of key to file name: found NoneType, expected "
        '{"weight_map": {"key": "file"}}. Fix: re-download the index'
    )


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    index = _two_shards(tmp_path, {"a": "a.safetensors", "b": "gone.safetensors"})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(index)
    assert str(info.value) == (
        f"{index}: key 'b': index names a missing shard: found 'gone.safetensors', expected the file "
        f"{tmp_path / 'gone.safetensors'}. Fix: download every shard the index lists"
    )


@pytest.mark.parametrize(
    "name", ["../a.safetensors", "/etc/passwd", "sub/../../a.safetensors", "..\\a.safetensors"]
)
def test_index_naming_a_shard_outside_its_folder(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = _two_shards(folder, {"a": name})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(index)
    assert str(info.value) == (
        f"{index}: key 'a': index names a shard outside its folder: found {name!r}, expected a file name inside "
        f"{folder}. Fix: the index is corrupt or malicious; use shard names without '..' or '/' at the start"
    )


def test_key_stored_in_two_shards(tmp_path: Path) -> None:
    index = _two_shards(tmp_path, {"a": "a.safetensors", "b": "b.safetensors", "c": "a.safetensors"})
    assert listing_error(index) == (
        f"{index}: key 'c': key is stored in two shards: found a.safetensors and b.safetensors, expected each key "
        "in one shard. Fix: the shards come from different saves; re-download them together"
    )


def test_key_missing_from_its_shard(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "a.safetensors", tensors={"a": torch.zeros(2)})
    save_safetensors(tmp_path / "b.safetensors", tensors={"b": torch.zeros(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "b": "a.safetensors"}}))
    assert listing_error(index) == (
        f"{index}: key 'b': index lists a key its shard does not hold: found not in a.safetensors, expected the "
        "key in a.safetensors. Fix: the index and the shards come from different saves"
    )


# Reads.


@pytest.fixture(params=["safetensors", "safetensors-sharded", "torch"])
def small(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    tensors = {"w": torch.zeros(4, 3), "v": torch.zeros(2)}
    if request.param == "safetensors":
        return save_safetensors(tmp_path / "w.safetensors", tensors=tensors)
    if request.param == "torch":
        return save_torch(tmp_path / "w.bin", tensors=tensors)
    return save_sharded(tmp_path, shards=[{"w": tensors["w"]}, {"v": tensors["v"]}])


def _holder(path: Path) -> Path:
    """The file named by key-level errors: the checkpoint file, or for an index the shard holding `w`."""
    return path.parent / "model-00001-of-00002.safetensors" if path.name.endswith(".json") else path


def test_unknown_key(small: Path) -> None:
    assert read_error(small, "x") == (
        f"{small}: key 'x': no such key in the checkpoint: found 2 keys, not this one. Fix: list the keys with "
        "`ownership plan --all-ranks`, or check the spelling"
    )


@pytest.mark.parametrize(
    ("selection", "found", "expected"),
    [
        ((None,), "1 dims selected", "2 (shape [4, 3])"),
        ((None, None, None), "3 dims selected", "2 (shape [4, 3])"),
    ],
)
def test_selection_with_the_wrong_number_of_dims(
    small: Path, selection: Selection, found: str, expected: str
) -> None:
    assert read_error(small, "w", selection) == (
        f"{_holder(small)}: key 'w': selection does not fit the tensor: found {found}, expected {expected}. {_FIX_PLAN}"
    )


@pytest.mark.parametrize(
    ("selection", "dim", "run"),
    [
        ((((0, 5, 1),), None), 0, [0, 5, 1]),
        ((((5, 5, 1),), None), 0, [5, 5, 1]),
        ((((-1, 2, 1),), None), 0, [-1, 2, 1]),
        ((((0, 2, 0),), None), 0, [0, 2, 0]),
        ((((0, 2, -1),), None), 0, [0, 2, -1]),
        ((None, ((0, 1, 1), (1, 4, 2))), 1, [1, 4, 2]),
    ],
)
def test_selection_outside_the_tensor(small: Path, selection: Selection, dim: int, run: list[int]) -> None:
    size = 4 if dim == 0 else 3
    assert read_error(small, "w", selection) == (
        f"{_holder(small)}: key 'w': selection run {run} on dim {dim} is outside the tensor: found run {run}, expected "
        f"indices within 0..{size - 1} and step >= 1 (shape [4, 3]). {_FIX_PLAN}"
    )
