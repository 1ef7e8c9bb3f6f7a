"""Test checkpoints written the way real tools write them, and the reference answer for a selection.

`reference(tensor, selection=...)` is computed independently of the library's readers: one `index_select` per dim
with the selection's index lists, i.e. `tensor[index]` for the equivalent advanced index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ownership.placement.selection import Selection, dim_indices

__all__ = [
    "reference",
    "save_safetensors",
    "save_sharded",
    "save_torch",
]


def save_safetensors(path: Path, *, tensors: Mapping[str, torch.Tensor]) -> Path:
    """One safetensors file, written by the safetensors library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def save_torch(path: Path, *, tensors: Mapping[str, torch.Tensor], legacy: bool = False) -> Path:
    """One `.bin`/`.pt` file written by `torch.save` (zip format, or the old pickle format with `legacy`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(tensors), path, _use_new_zipfile_serialization=not legacy)
    return path


def save_sharded(
    folder: Path,
    *,
    shards: Sequence[Mapping[str, torch.Tensor]],
    suffix: str = "safetensors",
    index_name: str | None = None,
) -> Path:
    """Shard files named like transformers names them, and their index; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
        if suffix == "safetensors":
            save_safetensors(folder / name, tensors=shard)
        else:
            save_torch(folder / name, tensors=shard)
        weight_map.update(dict.fromkeys(shard, name))
    index = folder / (index_name or f"{stem}.{suffix}.index.json")
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def reference(tensor: torch.Tensor, *, selection: Selection) -> torch.Tensor:
    """`tensor` indexed by the selection's index lists, one dim at a time."""
    if selection is None:
        return tensor.clone()
    out = tensor
    for d, dim in enumerate(selection):
        if dim is not None:
            index = torch.tensor(list(dim_indices(dim, tensor.shape[d])), dtype=torch.long)
            out = out.index_select(d, index)
    return out.contiguous()
