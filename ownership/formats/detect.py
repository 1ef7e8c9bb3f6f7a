"""Opening any checkpoint by path: a file, a sharded index, a PEFT adapter folder or an HF model folder.

Folders are recognised by their files, in this order: a PEFT adapter (`adapter_config.json` with
`adapter_model.safetensors` or `.bin`, or their index), then weights (`model.safetensors`,
`*.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`, or a single
`*.safetensors`/`*.bin`/`*.pt`). `adapter_config.json`, the config.json of its `base_model_name_or_path` when that
is a local folder, and `config.json`, merged in that order (later wins), become the
checkpoint's `config`, where params such as `num_experts` are read from. A checkpoint opened from a folder has
that folder as its `root`. `mmap=False` makes every read a private copy instead of a view of the file's pages.

Example:
    >>> import tempfile, json, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    >>> _ = (folder / "config.json").write_text(json.dumps({"num_experts": 8}))
    >>> with open_checkpoint(folder) as ckpt:
    ...     ckpt.kind, ckpt.config["num_experts"], [e.key for e in ckpt.entries()]
    ('hf-model', 8, ['w'])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ownership.errors import CheckpointError, did_you_mean, one_of
from ownership.formats.base import TORCH_SUFFIXES, Checkpoint
from ownership.formats.jsonfile import read_json_object
from ownership.formats.safetensors_file import SafetensorsFile
from ownership.formats.sharded import ShardedCheckpoint
from ownership.formats.torch_file import TorchFile

__all__ = ["CHECKPOINT_SUFFIXES", "open_checkpoint", "read_json_object"]

CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".json")
"""Suffixes of the files `open_checkpoint` takes: weights, and their index (`*.index.json`)."""
_ADAPTER_FILES = (
    "adapter_model.safetensors",
    "adapter_model.safetensors.index.json",
    "adapter_model.bin",
    "adapter_model.bin.index.json",
)
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def open_checkpoint(path: str | os.PathLike[str], *, mmap: bool = True) -> Checkpoint:
    """Open a checkpoint file or folder, detecting its format from names and contents."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            "no such checkpoint", source=str(path), found="no file or folder there", fix=_did_you_mean(path)
        )
    if path.is_file():
        # A file's folder holds its config, as a model folder does: an index or a shard is read with it.
        return _open_file(path, config=_folder_config(path.parent)[0], mmap=mmap)
    merged, adapter_config, config = _folder_config(path)
    if adapter_config is not None:
        for name in _ADAPTER_FILES:
            if (path / name).is_file():
                checkpoint = _open_file(path / name, config=merged, mmap=mmap)
                return _in_folder(checkpoint, folder=path, kind="peft-adapter")
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            checkpoint = _open_file(path / name, config=merged, mmap=mmap)
            return _in_folder(
                checkpoint, folder=path, kind="hf-model" if config is not None else checkpoint.kind
            )
    candidates = sorted(
        p
        for p in path.iterdir()
        if p.is_file()
        and (p.name.endswith((".safetensors", ".safetensors.index.json", *TORCH_SUFFIXES, ".bin.index.json")))
    )
    indexes = [p for p in candidates if p.name.endswith(".index.json")]
    if len(indexes) == 1:
        checkpoint = _open_file(indexes[0], config=merged, mmap=mmap)
        return _in_folder(checkpoint, folder=path, kind=checkpoint.kind)
    if len(candidates) == 1:
        checkpoint = _open_file(candidates[0], config=merged, mmap=mmap)
        return _in_folder(checkpoint, folder=path, kind=checkpoint.kind)
    raise CheckpointError(
        "no checkpoint recognised in this folder",
        source=str(path),
        found=", ".join(p.name for p in candidates) or "no weight files",
        expected="adapter_config.json + adapter_model.{safetensors,bin}[.index.json], or one of "
        + ", ".join(_WEIGHT_FILES)
        + ", or a single .safetensors/.bin/.pt file",
        fix="point at the weight file or index directly",
    )


def _folder_config(
    folder: Path,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]:
    """A folder's config: adapter_config.json, its base model's config.json, and config.json merged in that order
    (later wins); and the adapter config and the config themselves."""
    adapter_config = _json(folder / "adapter_config.json")
    config = _json(folder / "config.json")
    base_config = _base_model_config(adapter_config, folder=folder)
    parts = [c for c in (adapter_config, base_config, config) if c is not None]
    merged = {k: v for c in parts for k, v in c.items()} if parts else None
    return merged, adapter_config, config


def _did_you_mean(path: Path) -> str:
    """Check the path, naming the closest file or folder beside where it points, if one is close."""
    try:
        near = [child.name for child in path.parent.iterdir()] if path.parent.is_dir() else []
    except OSError:
        near = []
    close = did_you_mean(path.name, near)
    return (
        f"check the path (did you mean {one_of([str(path.parent / c) for c in close])}?)"
        if close
        else "check the path"
    )


def _base_model_config(adapter_config: dict[str, Any] | None, *, folder: Path) -> dict[str, Any] | None:
    """The config.json of an adapter's `base_model_name_or_path` when that is a local folder (a hub id is
    never fetched): as given, or relative to the adapter's folder."""
    name = (adapter_config or {}).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    for base in (Path(name), folder / name):
        if (base / "config.json").is_file():
            return _json(base / "config.json")
    return None


def _in_folder(checkpoint: Checkpoint, *, folder: Path, kind: str) -> Checkpoint:
    # `root` is what the user opened; entries' `file` stays relative to it (weights sit at the folder's top).
    checkpoint.root = folder
    checkpoint.kind = kind
    return checkpoint


def _open_file(path: Path, *, config: dict[str, Any] | None, mmap: bool) -> Checkpoint:
    if path.name.endswith(".index.json"):
        return ShardedCheckpoint(path, config=config, mmap=mmap)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path, config=config, mmap=mmap)
    if path.suffix == ".safetensors":
        return SafetensorsFile(path, config=config, mmap=mmap)
    raise CheckpointError(
        "unknown checkpoint file type",
        source=str(path),
        found=path.suffix or "no suffix",
        expected=".safetensors, .bin, .pt, .pth or *.index.json",
        fix="rename the file to its format's suffix",
    )


def _json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None
