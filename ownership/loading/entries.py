"""Where a plan's entries come from: a checkpoint's headers, or a key list where dtype and shape may be unknown.

`entries_from(source)` is the one reading of a source for planning and linting: a checkpoint path (its
`config.json` comes along, for params), an open `Checkpoint`, the entries a checkpoint lists, keys, or
`(key, dtype, shape)` triples. `read_keys_file` parses `--keys` files; `entry_nbytes` / `selected_nbytes` count
bytes where dtype and shape are known.

Example:
    >>> entries, config = entries_from(["m.norm.weight", ("m.embed.weight", "BF16", [8, 4])])
    >>> entries[1], selected_nbytes(entries[1], (((0, 2, 1),), None)), config
    (KeyEntry(key='m.embed.weight', dtype='BF16', shape=(8, 4)), 16, None)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeAlias, cast

from ownership import limits
from ownership.errors import CheckpointError, DecisionError, short
from ownership.formats.base import Checkpoint
from ownership.formats.detect import open_checkpoint
from ownership.formats.dtypes import dtype_itemsize
from ownership.placement.decision import Decision
from ownership.placement.selection import Selection, selection_shape

__all__ = [
    "EntryLike",
    "KeyEntry",
    "Source",
    "check_shape",
    "entries_from",
    "entry_nbytes",
    "keys_config",
    "read_keys_file",
    "read_keys_path",
    "selected_nbytes",
]


class EntryLike(Protocol):
    """What a plan needs of a checkpoint entry."""

    @property
    def key(self) -> str: ...
    @property
    def dtype(self) -> str | None: ...
    @property
    def shape(self) -> tuple[int, ...] | None: ...


class KeyEntry(NamedTuple):
    """An entry known by name, optionally with dtype and shape (from `--keys` files or key lists)."""

    key: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None


def entry_nbytes(entry: EntryLike, decision: Decision | None = None) -> int | None:
    """Bytes of the entry, or of the part a decision selects; None where dtype or shape is unknown."""
    return selected_nbytes(entry, None if decision is None else decision.selection)


def selected_nbytes(entry: EntryLike, selection: Selection) -> int | None:
    """Bytes of the part of the entry a selection keeps; None where dtype or shape is unknown."""
    if entry.dtype is None or entry.shape is None:
        return None
    count = 1
    for size in selection_shape(selection, entry.shape):
        count *= size
    return count * dtype_itemsize(entry.dtype)


Source: TypeAlias = (
    str
    | os.PathLike[str]
    | Checkpoint
    | Iterable["EntryLike | str | tuple[str, str | None, Sequence[int] | None]"]
)
"""What planning and linting take: a checkpoint path, an open checkpoint, entries, keys, or (key, dtype, shape)."""


def entries_from(source: Source) -> tuple[list[EntryLike], Mapping[str, Any] | None]:
    """The entries of `source`, and the config that came with it (a checkpoint's config.json, else None).

    A path is opened, listed from its headers and closed; an open `Checkpoint` is listed and left open.
    """
    if isinstance(source, (str, os.PathLike)):
        with open_checkpoint(source) as checkpoint:
            return list(checkpoint.entries()), checkpoint.config
    if isinstance(source, Checkpoint):
        return list(source.entries()), source.config
    out: list[EntryLike] = []
    for item in source:
        if isinstance(item, str):
            out.append(KeyEntry(item))
        elif isinstance(item, (tuple, list)) and not hasattr(item, "key"):
            key, dtype, shape = item
            out.append(KeyEntry(key, dtype, None if shape is None else tuple(shape)))
        else:
            # Any entry object: a checkpoint's own (a tuple of more fields), a KeyEntry, a caller's.
            out.append(cast(EntryLike, item))
    return out, None


def read_keys_path(path: Path) -> list[KeyEntry]:
    """Read a `--keys` file (`read_keys_file`), or the key names of a sharded checkpoint's
    `model.safetensors.index.json` (its `weight_map`: a plan or lint before the shards are downloaded); a file
    that cannot be read or is not UTF-8 is a `CheckpointError`."""
    if path.suffix == ".json":
        return _index_keys(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointError("cannot read the key list", source=str(path), found=error.strerror) from None
    except UnicodeDecodeError as error:
        raise CheckpointError(
            "cannot read the key list",
            source=str(path),
            found=f"bytes that are not UTF-8 ({error.reason} at byte {error.start})",
            expected="a UTF-8 text file, one key a line",
            fix="save the key list as UTF-8",
        ) from None
    return read_keys_file(text.splitlines(), source=str(path))


def _index_keys(path: Path) -> list[KeyEntry]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError("cannot read the index", source=str(path), found=error.strerror) from None
    if len(data) > limits.MAX_JSON_BYTES:
        raise limits.over_limit(
            "the index", name="MAX_JSON_BYTES", found=f"{len(data):,} bytes", source=str(path)
        )
    index = limits.parse_json(data, source=str(path), what="the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(key, str) for key in weight_map):
        raise CheckpointError(
            "not a checkpoint index",
            source=str(path),
            found=short(index),
            expected='{"weight_map": {key: shard file, ...}}, as model.safetensors.index.json has',
            fix="pass the index of a sharded checkpoint, or a key list (one key a line)",
        )
    return read_keys_file(weight_map, source=str(path))


def keys_config(path: Path) -> dict[str, Any] | None:
    """The `config.json` beside an index given as `--keys`, whose model facts it plans with; None for a key
    list, or an index with no config beside it."""
    config = path.parent / "config.json"
    if path.suffix != ".json" or not config.is_file():
        return None
    data = limits.parse_json(config.read_bytes(), source=str(config), what="the config")
    return data if isinstance(data, dict) else None


def read_keys_file(lines: Iterable[str], *, source: str) -> list[KeyEntry]:
    """Parse a `--keys` file: one key a line, optionally `key<TAB>dtype<TAB>[d0,d1,...]`; '#' starts a comment."""
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        key = fields[0].strip()
        if len(key) > limits.MAX_KEY_LENGTH:
            raise limits.over_limit(
                f"the key on line {number}",
                name="MAX_KEY_LENGTH",
                found=f"{len(key):,} characters",
                source=source,
            )
        if len(fields) > 3:
            raise DecisionError(
                f"too many fields on line {number}",
                source=source,
                key=key,
                found=f"{len(fields)} tab-separated fields",
                expected="key, or key<TAB>dtype<TAB>[shape]",
                fix="remove the extra fields",
                code="bad-keys-file",
            )
        dtype = fields[1].strip() if len(fields) > 1 and fields[1].strip() else None
        shape = None
        if len(fields) > 2 and fields[2].strip():
            text = fields[2].strip().strip("[]()")
            try:
                shape = tuple(int(x) for x in text.split(",") if x.strip())
            except ValueError:
                raise DecisionError(
                    f"cannot read the shape on line {number}",
                    source=source,
                    key=key,
                    found=short(fields[2]),
                    expected="[d0,d1,...]",
                    fix="write the shape as a bracketed, comma-separated list of ints",
                    code="bad-keys-file",
                ) from None
            check_shape(shape, key=key, source=f"{source}, line {number}")
        out.append(KeyEntry(key, dtype, shape))
    return out


def check_shape(shape: Sequence[int], *, key: str | None = None, source: str | None = None) -> None:
    """A `DecisionError` for a shape with a negative dim, or with more elements than `MAX_TENSOR_ELEMENTS`."""
    if any(size < 0 for size in shape):
        raise DecisionError(
            "a shape with a negative dim",
            source=source,
            key=key,
            found=short(list(shape)),
            expected="dims >= 0",
            fix="write the tensor's shape as its header gives it",
            code="bad-shape",
        )
    elements = 1
    for size in shape:
        elements *= size
        if elements > limits.MAX_TENSOR_ELEMENTS:
            raise limits.over_limit(
                "the tensor's element count",
                name="MAX_TENSOR_ELEMENTS",
                found=f"shape {short(list(shape))}",
                error=DecisionError,
                source=source,
                key=key,
                fix="write the tensor's shape as its header gives it",
            )
