"""The JSON files of a checkpoint: `config.json`, `adapter_config.json` and `*.index.json`, read whole and checked.

A file that cannot be read, is too large (`MAX_JSON_BYTES`), is not JSON, is nested past the recursion limit or
holds a number past Python's digit limit is a `CheckpointError` naming the file, never a traceback.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "config.json"
    >>> _ = path.write_text(json.dumps({"num_experts": 8}))
    >>> read_json_object(path, what="the config")
    {'num_experts': 8}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ownership.errors import CheckpointError
from ownership.limits import MAX_JSON_BYTES, over_limit, parse_json

__all__ = ["read_json_object"]


def read_json_object(
    path: Path, *, what: str = "JSON", expected: str | None = None, fix: str = "fix or remove the file"
) -> dict[str, Any]:
    """A JSON file that must hold an object (a config.json, say); anything else is a `CheckpointError`."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise over_limit(what, name="MAX_JSON_BYTES", found=f"{size:,} bytes", source=str(path))
        raw = path.read_bytes()
    except OSError as error:
        raise CheckpointError(
            f"cannot read {what}", source=str(path), found=error.strerror, expected=expected, fix=fix
        ) from None
    try:
        data = parse_json(raw, source=str(path), what=what)
    except CheckpointError as error:
        raise CheckpointError(
            error.message, source=str(path), found=error.found, expected=expected, fix=fix
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{what} is not an object",
            source=str(path),
            found=type(data).__name__,
            expected=expected,
            fix=fix,
        )
    return data
