"""Bad checkpoints get a clear `CheckpointError` naming the file and key; messages pinned."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ownership import CheckpointError, load_ruleset
from ownership.cli import main
from ownership.formats import WholeFileReadWarning, open_checkpoint


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def error_of(path: Path, *, read: str | None = None, selection: object = None) -> CheckpointError:
    with pytest.raises(CheckpointError) as info, open_checkpoint(path) as ckpt:
        ckpt.entries()
        if read is not None:
            ckpt.read(read, selection)  # type: ignore[arg-type]
    return info.value


def test_missing_path(tmp_path: Path) -> None:
    assert (
        str(error_of(tmp_path / "nope"))
        == f"{tmp_path / 'nope'}: no such file or folder. Fix: check the path"
    )


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = write(tmp_path / "w.safetensors", {"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert str(error_of(path)) == (
        f"{path}: key 'w': corrupt or truncated safetensors file: found data offsets [0, 16384] past the 8156 data "
        "bytes, expected offsets inside the file (truncated file?). Fix: re-download or re-save the file"
    )
    path.write_bytes(data[:5])
    assert "found 5 bytes, expected at least 8 bytes of header length" in str(error_of(path))
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    assert "found header length 1000000 in a file of 10 bytes" in str(error_of(path))


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    assert "corrupt or truncated safetensors file: found a header that is not JSON" in str(error_of(path))


def sharded(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    write(tmp_path / "a.safetensors", {"a": torch.zeros(2), "c": torch.zeros(1)})
    write(tmp_path / "b.safetensors", {"b": torch.ones(2), "c": torch.zeros(1)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_with_missing_shard(tmp_path: Path) -> None:
    index = sharded(tmp_path, {"a": "a.safetensors", "b": "gone.safetensors"})
    assert str(error_of(index)) == (
        f"{index}: key 'b': index names a missing shard: found 'gone.safetensors', expected the file "
        f"{tmp_path / 'gone.safetensors'}. Fix: download every shard the index lists"
    )


@pytest.mark.parametrize("name", ["../a.safetensors", "/etc/passwd", "sub/../../a.safetensors"])
def test_index_path_outside_its_folder(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = sharded(folder, {"a": name})
    message = str(error_of(index))
    assert message.startswith(f"{index}: key 'a': index names a shard outside its folder: found {name!r}")
    assert message.endswith(
        "Fix: the index is corrupt or malicious; use shard names without '..' or '/' at the start"
    )


def test_key_in_two_shards(tmp_path: Path) -> None:
    index = sharded(tmp_path, {"a": "a.safetensors", "b": "b.safetensors", "c": "a.safetensors"})
    assert str(error_of(index)) == (
        f"{index}: key 'c': key is stored in two shards: found a.safetensors and b.safetensors, expected each key "
        "in one shard. Fix: the shards come from different saves; re-download them together"
    )


def test_key_missing_from_its_shard(tmp_path: Path) -> None:
    write(tmp_path / "a.safetensors", {"a": torch.zeros(2)})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "z": "a.safetensors"}}))
    assert "key 'z': index lists a key its shard does not hold: found not in a.safetensors" in str(
        error_of(index)
    )


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch EVIL_MARKER",))


def test_malicious_pickle_is_never_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "adapter_model.bin"
    torch.save({"w": torch.zeros(2), "evil": Evil()}, path)
    error = error_of(path)
    assert not (tmp_path / "EVIL_MARKER").exists()
    assert str(error).startswith(
        f"{path}: refused to unpickle: the file holds more than plain tensors: found "
    )
    assert str(error).endswith(
        "expected a state dict of tensors (torch.load weights_only=True). Fix: convert the checkpoint to "
        "safetensors with a tool you trust; it was not executed"
    )
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.warns(WholeFileReadWarning):
        error_of(raw)
    assert not (tmp_path / "EVIL_MARKER").exists()


def test_state_dict_with_non_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    assert str(error_of(path)) == (
        f"{path}: key 'step': state dict entry is not a tensor: found int, expected a torch.Tensor under a string "
        "key. Fix: save a flat state dict of tensors"
    )


def test_legacy_pickle_loads_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    with (
        pytest.warns(WholeFileReadWarning, match="cannot be memory-mapped: it is read whole"),
        open_checkpoint(path) as ckpt,
    ):
        assert ckpt.read("w", (((1, 3, 1),),)).tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ((((0, 5, 1),), None), "selection run [0, 5, 1] on dim 0 is outside the tensor: found run [0, 5, 1]"),
        ((((0, 2, 0),), None), "selection run [0, 2, 0] on dim 0 is outside the tensor"),
        ((None,), "selection does not fit the tensor: found 1 dims selected, expected 2 (shape [4, 3])"),
    ],
)
@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_selection_outside_the_tensor(tmp_path: Path, selection: object, message: str, suffix: str) -> None:
    path = tmp_path / f"w.{suffix}"
    tensors = {"w": torch.zeros(4, 3)}
    write(path, tensors) if suffix == "safetensors" else torch.save(tensors, path)
    error = error_of(path, read="w", selection=selection)
    assert str(error).startswith(f"{path}: key 'w': {message}")


def test_unknown_key_on_read(tmp_path: Path) -> None:
    path = write(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    assert str(error_of(path, read="v")) == (
        f"{path}: key 'v': no such key in the checkpoint: found 1 keys, not this one. Fix: list the keys with "
        "`ownership plan --all-ranks`, or check the spelling"
    )


def test_folder_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    assert str(error_of(tmp_path)).startswith(
        f"{tmp_path}: no checkpoint recognised in this folder: found no weight files"
    )


def test_dtype_that_cannot_be_cast(tmp_path: Path) -> None:
    from ownership.loader import load

    path = write(tmp_path / "w.safetensors", {"m.experts.0.w.x": torch.zeros(2)})
    with pytest.raises(CheckpointError) as info:
        load(
            load_ruleset("vllm-ep-lora"),
            path,
            mesh="ep=1",
            rank=0,
            params={"num_experts": 1},
            dtype=torch.int8,
        )
    assert str(info.value) == (
        "key 'm.experts.0.w.x': cannot cast a torch.float32 tensor to torch.int8: found torch.float32, expected a "
        "floating-point target dtype. Fix: pass a floating-point dtype such as torch.bfloat16, or none"
    )


def test_failed_cli_load_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "w.safetensors", {"m.layers.0.mlp.experts.9.w.lora_A.weight": torch.zeros(2)})
    out = tmp_path / "out" / "rank0.safetensors"
    status = main(
        [
            "load",
            "vllm-ep-lora",
            str(path),
            "--mesh",
            "ep=2",
            "--rank",
            "0",
            "--param",
            "num_experts=4",
            "--out",
            str(out),
        ]
    )
    assert status == 2
    assert "captured expert 9 is out of range" in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_load_writes_a_shard_that_assembles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ownership.assemble import assemble

    tensors = {f"m.layers.0.mlp.experts.{e}.w.lora_A.weight": torch.full((2, 3), float(e)) for e in range(4)}
    path = write(tmp_path / "w.safetensors", tensors)
    outs = []
    for rank in range(2):
        out = tmp_path / f"rank{rank}.safetensors"
        assert (
            main(
                [
                    "load",
                    "vllm-ep-lora",
                    str(path),
                    "--mesh",
                    "ep=2",
                    "--rank",
                    str(rank),
                    "--param",
                    "num_experts=4",
                    "--out",
                    str(out),
                    "--format",
                    "json",
                ]
            )
            == 0
        )
        summary = json.loads(capsys.readouterr().out)
        assert summary["bytes_read"] == summary["bytes_owned"] == 48
        outs.append(out)
    joined = assemble(outs)
    assert all(torch.equal(joined[k], v) for k, v in tensors.items())
