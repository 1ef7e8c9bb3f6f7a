"""`open_checkpoint` recognises files and folders by their names, and says what it opened."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ownership.formats import Checkpoint, open_checkpoint
from tests.conftest import FIXTURES
from tests.formats.builders import save_safetensors, save_sharded, save_torch

TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int32)}
CONFIG = {"model_type": "qwen3_moe", "num_experts": 8}
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 4, "target_modules": ["experts"]}


def _config(folder: Path, name: str, data: dict[str, object]) -> None:
    (folder / name).write_text(json.dumps(data))


def _opened(path: Path) -> tuple[str, Path, dict[str, object] | None, list[tuple[str, str]]]:
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, Checkpoint)
        return (
            checkpoint.kind,
            checkpoint.root,
            checkpoint.config,
            [(e.key, e.file) for e in checkpoint.entries()],
        )


def test_single_files(tmp_path: Path) -> None:
    st = save_safetensors(tmp_path / "weights.safetensors", tensors=TENSORS)
    assert _opened(st) == (
        "safetensors",
        st,
        None,
        [("a", "weights.safetensors"), ("b", "weights.safetensors")],
    )
    for name in ["weights.bin", "weights.pt", "weights.pth"]:
        path = save_torch(tmp_path / name, tensors=TENSORS)
        assert _opened(path) == ("torch", path, None, [("a", name), ("b", name)])


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_index_file(tmp_path: Path, suffix: str) -> None:
    index = save_sharded(tmp_path, shards=[{"a": TENSORS["a"]}, {"b": TENSORS["b"]}], suffix=suffix)
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    kind = "safetensors-sharded" if suffix == "safetensors" else "torch-sharded"
    files = [("a", f"{stem}-00001-of-00002.{suffix}"), ("b", f"{stem}-00002-of-00002.{suffix}")]
    assert _opened(index) == (kind, index, None, files)


@pytest.mark.parametrize(
    "layout",
    [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ],
)
def test_hf_model_folder(tmp_path: Path, layout: str) -> None:
    if layout == "model.safetensors":
        save_safetensors(tmp_path / layout, tensors=TENSORS)
    elif layout == "pytorch_model.bin":
        save_torch(tmp_path / layout, tensors=TENSORS)
    else:
        save_sharded(tmp_path, shards=[{"a": TENSORS["a"]}, {"b": TENSORS["b"]}], suffix=layout.split(".")[1])
    _config(tmp_path, "config.json", CONFIG)
    kind, root, config, entries = _opened(tmp_path)
    assert (kind, root, config) == ("hf-model", tmp_path, CONFIG)
    assert [key for key, _ in entries] == ["a", "b"]
    # Each entry's file is relative to the folder the checkpoint was opened from.
    assert all((tmp_path / file).is_file() for _, file in entries)


@pytest.mark.parametrize(
    "layout", ["adapter_model.safetensors", "adapter_model.bin", "adapter_model.safetensors.index.json"]
)
def test_peft_adapter_folder(tmp_path: Path, layout: str) -> None:
    if layout == "adapter_model.safetensors":
        save_safetensors(tmp_path / layout, tensors=TENSORS)
    elif layout == "adapter_model.bin":
        save_torch(tmp_path / layout, tensors=TENSORS)
    else:
        save_sharded(tmp_path, shards=[{"a": TENSORS["a"]}, {"b": TENSORS["b"]}], index_name=layout)
    _config(tmp_path, "adapter_config.json", ADAPTER_CONFIG)
    kind, root, config, entries = _opened(tmp_path)
    assert (kind, root, config) == ("peft-adapter", tmp_path, ADAPTER_CONFIG)
    assert [key for key, _ in entries] == ["a", "b"]


def test_folder_of_shards_without_config(tmp_path: Path) -> None:
    save_sharded(tmp_path, shards=[{"a": TENSORS["a"]}, {"b": TENSORS["b"]}])
    (tmp_path / "README.md").write_text("shards only")
    assert _opened(tmp_path)[:3] == ("safetensors-sharded", tmp_path, None)


def test_folder_with_one_weight_file(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "consolidated.safetensors", tensors=TENSORS)
    assert _opened(tmp_path)[:3] == ("safetensors", tmp_path, None)


def test_index_naming_shards_in_a_subfolder(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "shards" / "one.safetensors", tensors={"a": TENSORS["a"]})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shards/one.safetensors"}}))
    with open_checkpoint(index) as checkpoint:
        assert [(e.key, e.file) for e in checkpoint.entries()] == [("a", "shards/one.safetensors")]
        assert torch.equal(checkpoint.read("a"), TENSORS["a"])


def test_hugging_face_cache_snapshot_of_symlinks(tmp_path: Path) -> None:
    """A hub cache snapshot is a folder of symlinks into `../../blobs`: its shards are inside the snapshot."""
    source = tmp_path / "download"
    save_sharded(source, shards=[{"a": TENSORS["a"]}, {"b": TENSORS["b"]}])
    _config(source, "config.json", CONFIG)
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, blobs / f"sha-{file.name}")
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", f"sha-{file.name}"))
    with open_checkpoint(snapshot) as checkpoint:
        assert (checkpoint.kind, checkpoint.root) == ("hf-model", snapshot)
        assert torch.equal(checkpoint.read("b"), TENSORS["b"])


@pytest.mark.parametrize(
    ("name", "kind", "config_key"),
    [
        ("qwen3_moe/base", "hf-model", "num_local_experts"),
        ("qwen3_moe/base_bin", "hf-model", "num_experts"),
        ("qwen3_moe/lora_per_expert", "peft-adapter", "r"),
        ("qwen3_moe/lora_fused_bin", "peft-adapter", "r"),
        ("mixtral/base", "hf-model", "num_local_experts"),
        ("mixtral/lora_fused", "peft-adapter", "r"),
    ],
)
def test_checkpoints_written_by_transformers_and_peft(name: str, kind: str, config_key: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_checkpoint(FIXTURES / name) as checkpoint:
            assert (checkpoint.kind, checkpoint.root) == (kind, FIXTURES / name)
            assert checkpoint.config is not None and config_key in checkpoint.config
            entries = checkpoint.entries()
            assert entries and all((FIXTURES / name / e.file).is_file() for e in entries)
            assert checkpoint.stats.bytes_read == 0
