"""PyTorch pickles: only plain tensors are ever unpickled; anything else is refused without running it."""

from __future__ import annotations

import builtins
import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ownership.errors import CheckpointError
from ownership.formats import WholeFileReadWarning, open_checkpoint
from tests.formats.builders import save_sharded, save_torch


class RunsShell:
    """Pickles to a call of os.system that would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """Pickles to a call of exec that would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _error(path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WholeFileReadWarning)
        with pytest.raises(CheckpointError) as info, open_checkpoint(path) as checkpoint:
            checkpoint.entries()
    return str(info.value)


_REFUSED = "refused to unpickle: the file holds more than plain tensors: found "
_REFUSED_END = (
    "expected a state dict of tensors (torch.load weights_only=True). Fix: convert the checkpoint to safetensors "
    "with a tool you trust; it was not executed"
)


# Each payload with the sentence of torch's refusal that the error keeps (not torch's advice to load it with
# weights_only=False or to allow-list the global).
PAYLOADS = [
    (RunsShell, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
    (RunsPython, "Unsupported global: GLOBAL exec was not an allowed global by default"),
]


@pytest.mark.parametrize(("payload", "reason"), PAYLOADS, ids=["os.system", "exec"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_run(
    tmp_path: Path, payload: type[RunsShell | RunsPython], reason: str, legacy: bool
) -> None:
    marker = tmp_path / "MARKER"
    tensors = {"w": torch.zeros(2), "x": payload(marker)}
    path = save_torch(tmp_path / "adapter_model.bin", tensors=tensors, legacy=legacy)  # type: ignore[arg-type]
    message = _error(path)
    assert not marker.exists()
    assert message == f"{path}: {_REFUSED}{reason}, {_REFUSED_END}"


def test_bare_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(RunsShell(marker), protocol=2))
    assert _error(path).startswith(f"{path}: {_REFUSED}")
    assert not marker.exists()


def test_malicious_shard_is_refused_when_listing(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    index = save_sharded(tmp_path, shards=[{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], suffix="bin")
    save_torch(tmp_path / "pytorch_model-00002-of-00002.bin", tensors={"b": RunsShell(marker)})  # type: ignore[dict-item]
    assert _error(index).startswith(f"{tmp_path / 'pytorch_model-00002-of-00002.bin'}: {_REFUSED}")
    assert not marker.exists()


def test_value_that_is_not_a_tensor(tmp_path: Path) -> None:
    path = save_torch(tmp_path / "m.bin", tensors={"w": torch.zeros(2), "step": 3})  # type: ignore[dict-item]
    assert _error(path) == (
        f"{path}: key 'step': state dict entry is not a tensor: found int, expected a torch.Tensor under a string "
        "key. Fix: save a flat state dict of tensors"
    )


def test_nested_state_dict(tmp_path: Path) -> None:
    path = save_torch(tmp_path / "m.pt", tensors={"model": {"w": torch.zeros(2)}})  # type: ignore[dict-item]
    assert _error(path) == (
        f"{path}: key 'model': state dict entry is not a tensor: found dict, expected a torch.Tensor under a string "
        "key. Fix: save a flat state dict of tensors"
    )


def test_key_that_is_not_a_string(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save({1: torch.zeros(2)}, path)
    assert _error(path) == (
        f"{path}: key '1': state dict entry is not a tensor: found a int key, expected a torch.Tensor under a "
        "string key. Fix: save a flat state dict of tensors"
    )


def test_pickle_that_is_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    torch.save([torch.zeros(2)], path)
    assert _error(path) == (
        f"{path}: not a state dict: found list, expected a dict of tensor name to tensor. Fix: save "
        "model.state_dict(), not the model"
    )


def test_truncated_zip(tmp_path: Path) -> None:
    path = save_torch(tmp_path / "m.bin", tensors={"w": torch.zeros(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", WholeFileReadWarning)
        assert _error(path) == (
            f"{path}: corrupt or truncated PyTorch checkpoint: found a zip file without its central directory, "
            "expected a complete zip written by torch.save (truncated download?). Fix: re-download or re-save the file"
        )


@pytest.mark.parametrize(("content", "shown"), [(b"hello world", "b'hell'"), (b"", "b''")])
def test_file_that_is_not_a_pytorch_checkpoint(tmp_path: Path, content: bytes, shown: str) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(content)
    assert _error(path) == (
        f"{path}: not a PyTorch checkpoint: found a file starting with {shown}, expected a zip or a pickle written "
        "by torch.save. Fix: check the file; re-download or re-save it"
    )


def test_legacy_pickle_is_read_whole_with_a_warning(tmp_path: Path) -> None:
    full = torch.arange(12.0).reshape(4, 3)
    path = save_torch(
        tmp_path / "old.bin", tensors={"w": full, "b": torch.ones(2, dtype=torch.int64)}, legacy=True
    )
    with pytest.warns(WholeFileReadWarning) as record:
        checkpoint = open_checkpoint(path)
    assert str(record[0].message) == (
        f"{path} is an old non-zip pickle that cannot be memory-mapped: it is read whole, so peak memory is the "
        "whole file. Re-save it with torch.save or as safetensors to read only owned bytes."
    )
    with checkpoint:
        assert [(e.key, e.dtype, e.shape) for e in checkpoint.entries()] == [
            ("w", "F32", (4, 3)),
            ("b", "I64", (2,)),
        ]
        # The whole file was pulled in to list it, and that is what the totals say.
        assert checkpoint.stats.bytes_read == 12 * 4 + 2 * 8
        assert torch.equal(checkpoint.read("w", (((1, 3, 1),), ((0, 3, 2),))), full[1:3, 0:3:2])


def test_legacy_pickle_torch_cannot_read_back(tmp_path: Path) -> None:
    """torch's old format saves float8 storages untyped and its loader fails on them: still one CheckpointError."""
    path = save_torch(
        tmp_path / "old.pt", tensors={"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, legacy=True
    )
    assert _error(path).startswith(f"{path}: cannot read the PyTorch checkpoint: found ")


class NegativeShape:
    """Pickles to a real `_rebuild_tensor_v2` call whose shape no tensor can have."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        storage = torch.storage.TypedStorage(
            wrap_storage=self.tensor.untyped_storage(), dtype=torch.float32, _internal=True
        )
        return (torch._utils._rebuild_tensor_v2, (storage, 0, (2, -2), (2, 1), False, OrderedDict()))


def test_tensor_record_with_a_negative_size(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    weight = torch.zeros(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; torch.save still writes it
        torch.save({"w": weight, "bad": NegativeShape(weight)}, path)
    assert _error(path) == (
        f"{path}: key 'bad': cannot read the PyTorch checkpoint: found shape (2, -2), expected a tensor record as "
        "torch.save writes it. Fix: re-download or re-save the file"
    )
