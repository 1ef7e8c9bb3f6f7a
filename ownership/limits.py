"""Limits on input from strangers, named in one place (docs/limits.md says why each is where it is).

Checkpoints, rule files, configs and key lists come from a hub upload, a colleague's branch or a CI artifact, so
every size that would let an input cost unbounded time or memory is bounded here. Each is a module attribute: a
program that really needs more can raise it (`ownership.limits.MAX_RANKS = 2**20`) before it plans or loads.
Going past one is an `OwnershipError` that names the limit, the value found and this way out.

`parse_json` is the one JSON reading of the library (safetensors headers, index files, config files, params):
too deep a nesting and too long a number are errors like any other bad input, never a traceback.

Example:
    >>> parse_json(b'{"num_experts": 8}', source="config.json")
    {'num_experts': 8}
    >>> parse_json("[" * 100_000 + "]" * 100_000, source="config.json")
    Traceback (most recent call last):
    ...
    ownership.errors.CheckpointError: config.json: cannot read the JSON: found nesting deeper than the interpreter's recursion limit (1000 levels), expected plain JSON. Fix: fix or remove the file
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ownership.errors import CheckpointError, OwnershipError

__all__ = [
    "MAX_CUT_DIM",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_SIZE",
    "MAX_JSON_BYTES",
    "MAX_KEY_LENGTH",
    "MAX_RANKS",
    "MAX_RULES",
    "MAX_RULE_FILE_BYTES",
    "MAX_TEMPLATE_ALTERNATIVES",
    "MAX_TEMPLATE_LENGTH",
    "MAX_TENSOR_ELEMENTS",
    "over_limit",
    "parse_json",
]

MAX_HEADER_BYTES = 100 * 2**20
"""Bytes of a safetensors header (its JSON): the safetensors library's own bound."""
MAX_JSON_BYTES = 100 * 2**20
"""Bytes of an index, config.json or adapter_config.json."""
MAX_RULE_FILE_BYTES = 2**20
"""Bytes of a rule file or case file (the built-in ones are under 20 KiB)."""
MAX_RULES = 1024
"""Rules of one ruleset, its `extends` chain merged in: every rule is one branch of the joined pattern."""
MAX_TEMPLATE_LENGTH = 1024
"""Characters of one key template or raw regex."""
MAX_TEMPLATE_ALTERNATIVES = 256
"""Ways through the `{a,b}` alternations of one template (the product of their sizes)."""
MAX_KEY_LENGTH = 4096
"""Characters of one key, from a header, an index, a pickle or a key list."""
MAX_INDEX_SIZE = 2**20
"""Ids of a captured index (`num_experts`, `num_layers`): per-rank slot tables hold one entry per id."""
MAX_CUT_DIM = 2**24
"""Size of a tensor dim that a layout rule cuts: its owned indices are listed to make runs."""
MAX_TENSOR_ELEMENTS = 2**48
"""Elements of one tensor named in a key list (a checkpoint's own are bounded by its file's size)."""
MAX_RANKS = 2**16
"""Ranks of a mesh: whole-mesh plans, lint and `--all-ranks` output hold something per rank."""


def over_limit(
    what: str,
    *,
    name: str,
    found: str,
    error: type[OwnershipError] = CheckpointError,
    source: str | None = None,
    rule: str | None = None,
    key: str | None = None,
    fix: str = "check the input",
) -> OwnershipError:
    """The error for an input past the limit `name` of this module: the limit's value, and how to raise it.

    Example:
        >>> from ownership.errors import MeshError
        >>> print(over_limit("the mesh", name="MAX_RANKS", found="2**40 ranks", error=MeshError))
        the mesh is over the limit: found 2**40 ranks, expected at most 65,536 (MAX_RANKS). Fix: check the input; if it is right, raise ownership.limits.MAX_RANKS (docs/limits.md)
    """
    limit = globals()[name]
    return error(
        f"{what} is over the limit",
        source=source,
        rule=rule,
        key=key,
        found=found,
        expected=f"at most {limit:,} ({name})",
        fix=f"{fix}; if it is right, raise ownership.limits.{name} (docs/limits.md)",
        code="limit",
    )


def parse_json(text: str | bytes, *, source: str, what: str = "the JSON") -> Any:
    """`json.loads`, with every failure a `CheckpointError` naming `source`: malformed JSON, bytes that are not
    UTF-8, nesting past the recursion limit, numbers past Python's digit limit."""
    try:
        return json.loads(text)
    except RecursionError:
        found = f"nesting deeper than the interpreter's recursion limit ({sys.getrecursionlimit()} levels)"
    except UnicodeDecodeError as error:
        found = f"bytes that are not UTF-8 ({error.reason} at byte {error.start})"
    except json.JSONDecodeError as error:
        found = str(error)
    except ValueError as error:
        # int() refuses numbers of more digits than sys.get_int_max_str_digits() (4300 by default).
        found = f"a number too long to read ({str(error).split(';')[0]})"
    raise CheckpointError(
        f"cannot read {what}", source=source, found=found, expected="plain JSON", fix="fix or remove the file"
    )
