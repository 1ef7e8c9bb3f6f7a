"""Sharded checkpoints: an index (`*.safetensors.index.json`, `pytorch_model.bin.index.json`) naming a file per key.

Listing reads the index and each shard's header; tensor data is read only from the shards that hold the keys
asked for. Index paths must stay inside the index's folder, every shard must exist, and each key must be in
exactly the shard the index names.

Example:
    >>> import tempfile, json, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"a": torch.zeros(2)}, folder / "m-1.safetensors"); save_file({"b": torch.ones(2)}, folder / "m-2.safetensors")
    >>> _ = (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    >>> with ShardedCheckpoint(folder / "model.safetensors.index.json") as ckpt:
    ...     ckpt.read("b").tolist(), sorted(Path(p).name for p in ckpt.stats.files_opened)
    ([1.0, 1.0], ['m-2.safetensors'])
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ownership.errors import CheckpointError
from ownership.formats.base import TORCH_SUFFIXES, ByteRuns, Checkpoint, Entry, PendingRead
from ownership.formats.jsonfile import read_json_object
from ownership.formats.safetensors_file import SafetensorsFile
from ownership.formats.torch_file import TorchFile
from ownership.limits import MAX_KEY_LENGTH, over_limit
from ownership.placement.selection import Selection

if TYPE_CHECKING:
    import torch

__all__ = ["ShardedCheckpoint"]


class ShardedCheckpoint(Checkpoint):
    """Shard files listed by an index JSON's `weight_map`."""

    def __init__(
        self, index_path: str | os.PathLike[str], *, config: dict[str, Any] | None = None, mmap: bool = True
    ) -> None:
        index_path = Path(index_path)
        super().__init__(index_path, config=config, mmap=mmap)
        self.index_path = index_path
        self.folder = index_path.parent
        self.kind = "torch-sharded" if index_path.name.endswith(".bin.index.json") else "safetensors-sharded"
        self._weight_map = self._read_index(index_path)
        self._shards: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self._entries: list[Entry] | None = None

    def _read_index(self, path: Path) -> dict[str, str]:
        data = read_json_object(
            path, what="the index", expected="a JSON object with a weight_map", fix="re-download the index"
        )
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(
                "index has no weight_map of key to file name",
                source=str(path),
                found=f"{type(weight_map).__name__}",
                expected='{"weight_map": {"key": "file"}}',
                fix="re-download the index",
            )
        too_long = next((key for key in weight_map if len(key) > MAX_KEY_LENGTH), None)
        if too_long is not None:
            raise over_limit(
                "a key of the index",
                name="MAX_KEY_LENGTH",
                found=f"{len(too_long):,} characters",
                source=str(path),
            )
        # Each shard name checked once: an index names a few hundred shards for up to hundreds of thousands of keys.
        first_key: dict[str, str] = {}
        for key, name in weight_map.items():
            first_key.setdefault(name, key)
        for name, key in first_key.items():
            target = self.folder / name
            if _escapes(name):
                raise CheckpointError(
                    "index names a shard outside its folder",
                    source=str(path),
                    key=key,
                    found=repr(name),
                    expected=f"a file name inside {self.folder}",
                    fix="the index is corrupt or malicious; use shard names without '..' or '/' at the start",
                )
            if not target.is_file():
                raise CheckpointError(
                    "index names a missing shard",
                    source=str(path),
                    key=key,
                    found=repr(name),
                    expected=f"the file {self.folder / name}",
                    fix="download every shard the index lists",
                )
        return dict(weight_map)

    def _shard(self, name: str) -> Checkpoint:
        shard = self._shards.get(name)
        if shard is None:
            with self._lock:
                return self._open_shard(name)
        return shard

    def _open_shard(self, name: str) -> Checkpoint:
        shard = self._shards.get(name)
        if shard is None:
            path = self.folder / name
            display = str(path)
            kind = TorchFile if name.endswith(TORCH_SUFFIXES) else SafetensorsFile
            shard = kind(path, display=display, stats=self.stats, mmap=self.map_pages)
            self._shards[name] = shard
        return shard

    def entries(self) -> list[Entry]:
        if self._entries is None:
            self._entries = list(self.iter_entries())
        return list(self._entries)

    def iter_entries(self) -> Iterator[Entry]:
        if self._entries is not None:
            yield from self._entries
            return
        # Each shard's entries as its header is read; the index is checked against them at the end.
        seen: dict[str, str] = {}
        for name in dict.fromkeys(self._weight_map.values()):
            for entry in self._shard(name).iter_entries():
                if entry.key in seen:
                    raise CheckpointError(
                        "key is stored in two shards",
                        source=str(self.index_path),
                        key=entry.key,
                        found=f"{seen[entry.key]} and {name}",
                        expected="each key in one shard",
                        fix="the shards come from different saves; re-download them together",
                    )
                seen[entry.key] = name
                if self._weight_map.get(entry.key) == name:
                    yield Entry(entry.key, entry.dtype, entry.shape, name, offset=entry.offset)
        for key, name in self._weight_map.items():
            if seen.get(key) != name:
                raise CheckpointError(
                    "index lists a key its shard does not hold",
                    source=str(self.index_path),
                    key=key,
                    found=f"not in {name}" + (f" (it is in {seen[key]})" if key in seen else ""),
                    expected=f"the key in {name}",
                    fix="the index and the shards come from different saves",
                )

    def read(self, key: str, selection: Selection = None) -> torch.Tensor:
        return self.read_many([(key, selection)])[0]

    def prepare_many(self, requests: Sequence[tuple[str, Selection]]) -> PendingRead:
        parts: list[PendingRead] = []
        # Runs of keys in one shard go to that shard together.
        for name, group in groupby(requests, key=lambda request: self._weight_map.get(request[0])):
            run = list(group)
            if name is None:
                self.entry(run[0][0])
                raise AssertionError("unreachable")  # pragma: no cover
            parts.append(self._shard(name).prepare_many(run))
        return _Parts(parts)

    def files(self) -> list[Path]:
        return [self.index_path, *(self.folder / name for name in dict.fromkeys(self._weight_map.values()))]

    def byte_runs(self, key: str, selection: Selection = None) -> ByteRuns | None:
        name = self._weight_map.get(key)
        if name is None:
            self.entry(key)  # the unknown-key error
            raise AssertionError("unreachable")  # pragma: no cover
        return self._shard(name).byte_runs(key, selection)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


def _escapes(name: str) -> bool:
    """Whether a shard name leaves the index's folder: absolute, or `..` past its top.

    Judged on the name alone, not on resolved paths: a Hugging Face cache snapshot is a folder of symlinks
    into `../../blobs`, and those shards are legitimately inside their folder.
    """
    normal = posixpath.normpath(name.replace("\\", "/"))
    return posixpath.isabs(normal) or normal == ".." or normal.startswith("../")


class _Parts(PendingRead):
    """Reads prepared shard by shard, in request order."""

    def __init__(self, parts: list[PendingRead]) -> None:
        self.parts = parts

    def run(self) -> None:
        for part in self.parts:
            part.run()

    def result(self) -> list[torch.Tensor]:
        return [tensor for part in self.parts for tensor in part.result()]
