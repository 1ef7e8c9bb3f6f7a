"""Ownership's own shard files: one rank's tensors written with the selections that place them, and put back
together.

`save_shard` writes a rank's tensors under their local names to a safetensors file, atomically (a temporary file
renamed into place, so a failed write leaves nothing behind), with a metadata entry `ownership` that records,
for each local name, the original key, its global shape and the selection. `assemble` joins shard files back
into whole tensors and reports any element no shard covered: the reconstruction proof of a ruleset.

Example:
    >>> import tempfile, torch
    >>> from ownership.placement.decision import Decision
    >>> folder = tempfile.mkdtemp()
    >>> full = torch.arange(12.0).reshape(4, 3)
    >>> for rank, rows in enumerate([(0, 2, 1), (2, 4, 1)]):
    ...     d = Decision("w", owned=True, rule="r", local_key="w", selection=((rows,), None))
    ...     _ = save_shard(f"{folder}/{rank}.safetensors", [(d, (4, 3), full[rows[0]:rows[1]])], info={"rank": rank})
    >>> tensors = assemble([f"{folder}/0.safetensors", f"{folder}/1.safetensors"])
    >>> torch.equal(tensors["w"], full)
    True
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ownership.errors import CheckpointError, OutputError
from ownership.placement.decision import Decision
from ownership.placement.selection import Selection, dim_indices, selection_from_json, selection_to_json

__all__ = ["METADATA_KEY", "Assembler", "assemble", "save_shard", "shard_index"]

METADATA_KEY = "ownership"


def save_shard(
    path: str | os.PathLike[str],
    pieces: Iterable[tuple[Decision, Sequence[int], torch.Tensor]],
    *,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write `(decision, global shape, tensor)` pieces to a safetensors file, atomically: written to a temporary
    file beside it and renamed into place, so that a failure or an interrupt (the exception propagates, a signal
    the caller turns into one) leaves neither. The file gets the process's umask, as any file it creates; a place
    that cannot take it is an `OutputError`."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            "the output is a folder", source=str(path), expected="a file name", fix="name a .safetensors file"
        )
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for decision, shape, tensor in pieces:
        assert decision.local_key is not None
        tensors[decision.local_key] = tensor.contiguous()
        index[decision.local_key] = {
            "key": decision.key,
            "shape": list(shape),
            "rule": decision.rule,
            "selection": selection_to_json(decision.selection),
        }
    metadata = {METADATA_KEY: json.dumps({**(info or {}), "tensors": index}, separators=(",", ":"))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp makes files only their owner can read: give this one the mode any new file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise _cannot_write(path, error) from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cannot_write(path: Path, error: BaseException) -> OutputError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return OutputError(
        "cannot write the output",
        source=str(path),
        found=reason,
        expected="a file in a folder this process can write",
        fix="choose another --out, or make its folder writable",
    )


def shard_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `ownership` metadata of a shard file: run info and, per local name, key, shape and selection."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            "not a shard written by `ownership load`",
            source=str(path),
            found=f"metadata keys {sorted(metadata)}",
            expected=f"a {METADATA_KEY!r} metadata entry",
            fix="assemble files written by `ownership load --out`",
        )
    index: dict[str, Any] = json.loads(metadata[METADATA_KEY])
    return index


def assemble(
    paths: Iterable[str | os.PathLike[str]], *, check_coverage: bool = True
) -> dict[str, torch.Tensor]:
    """Join shard files into whole tensors by their recorded selections.

    Elements held by several shards must agree bit for bit. With `check_coverage`, an element no shard holds is
    a `CheckpointError` naming the key and how many elements are missing.
    """
    joined = Assembler()
    for path in paths:
        index = shard_index(path)["tensors"]
        with safe_open(str(path), framework="pt") as handle:
            for local_key, meta in index.items():
                joined.add(
                    meta["key"],
                    tuple(meta["shape"]),
                    handle.get_tensor(local_key),
                    selection_from_json(meta["selection"]),
                    source=str(path),
                )
    return joined.result(check_coverage=check_coverage)


class Assembler:
    """Whole tensors built up from pieces and their selections, checking that overlapping pieces agree.

    Example:
        >>> joined = Assembler()
        >>> joined.add("w", (4,), torch.tensor([1.0, 2.0]), ((( 0, 2, 1),),), source="rank 0")
        >>> joined.add("w", (4,), torch.tensor([3.0, 4.0]), (((2, 4, 1),),), source="rank 1")
        >>> joined.result()["w"].tolist()
        [1.0, 2.0, 3.0, 4.0]
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.covered: dict[str, torch.Tensor] = {}

    def add(
        self, key: str, shape: Sequence[int], piece: torch.Tensor, selection: Selection, *, source: str
    ) -> None:
        """Place `piece`, the `selection` of the tensor `key` of global `shape`."""
        if key not in self.tensors:
            self.tensors[key] = torch.zeros(tuple(shape), dtype=piece.dtype)
            self.covered[key] = torch.zeros(tuple(shape), dtype=torch.bool)
        _place(self.tensors[key], self.covered[key], piece, selection, key=key, source=source)

    def result(self, *, check_coverage: bool = True) -> dict[str, torch.Tensor]:
        """The joined tensors; with `check_coverage`, an element no piece held is a `CheckpointError`."""
        if check_coverage:
            for key, mask in self.covered.items():
                missing = int((~mask).sum())
                if missing:
                    raise CheckpointError(
                        "elements of this tensor are in no shard",
                        key=key,
                        found=f"{missing} of {mask.numel()} elements missing",
                        expected="every element owned by at least one rank",
                        fix="lint the ruleset against this checkpoint and mesh (`ownership lint`)",
                    )
        return self.tensors


def _place(
    full: torch.Tensor,
    covered: torch.Tensor,
    piece: torch.Tensor,
    selection: Selection,
    *,
    key: str,
    source: str,
) -> None:
    num_dims = full.dim()
    where: tuple[Any, ...] = _slices(selection, num_dims)
    if not where:
        # One index tensor per dim, shaped to broadcast along its own dim: an outer-product index (numpy's ix_).
        index = []
        for d in range(num_dims):
            dim = None if selection is None else selection[d]
            shape = [1] * num_dims
            shape[d] = -1
            index.append(torch.tensor(list(dim_indices(dim, full.shape[d])), dtype=torch.long).view(shape))
        where = tuple(index)
    region = full[where] if num_dims else full
    if piece.shape != region.shape:
        raise CheckpointError(
            "a shard's piece does not fit its selection",
            source=source,
            key=key,
            found=f"shape {list(piece.shape)}",
            expected=f"shape {list(region.shape)}",
            fix="the shard file was changed after it was written",
        )
    seen = covered[where] if num_dims else covered
    clash = seen & ~_bitwise_equal(region, piece)
    if bool(clash.any()):
        raise CheckpointError(
            "two shards hold different values for the same elements",
            source=source,
            key=key,
            found=f"{int(clash.sum())} elements differ",
            expected="replicas equal bit for bit",
            fix="the shards come from different checkpoints",
        )
    if num_dims:
        full[where] = piece
        covered[where] = True
    else:
        full.copy_(piece)
        covered.fill_(True)


def _slices(selection: Selection, num_dims: int) -> tuple[slice, ...]:
    """Basic slices when every dim is whole or one run (the common case, and a view), else ()."""
    if selection is None:
        return (slice(None),) * num_dims
    out = []
    for dim in selection:
        if dim is None:
            out.append(slice(None))
        elif len(dim) == 1:
            out.append(slice(*dim[0]))
        else:
            return ()
    return tuple(out)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise equality of the bits (so NaNs and -0.0 compare as stored)."""
    if a.dtype.is_floating_point or a.dtype.is_complex:
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.contiguous().view(view) == b.contiguous().view(view)
    return a == b
