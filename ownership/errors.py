"""The library's exception types, all in one place.

    OwnershipError            every error on bad input; `code` is the linter's id for it
    ├── RulesetError          a rule file or ruleset: schema, pattern, layout, axis, param, case file
    ├── DecisionError         a valid ruleset cannot decide a key: out of range, does not divide, unmatched
    ├── MeshError             a mesh, a rank, a process group or DeviceMesh that does not fit
    ├── CheckpointError       a checkpoint cannot be listed or read: missing, truncated, corrupt, unsafe
    ├── OutputError           an output file cannot be written where it was asked to go
    └── IntegrityError        the ranks' loads, taken together, are not the checkpoint (`load_distributed`)

Every error names what it is about (the file, the rule id, the key), what was found, what was expected and the
fix, so a user can act on it without reading the source. Each field is optional; `str(error)` joins those given
in a fixed order.

Example:
    >>> str(DecisionError("captured index out of range", key="x.experts.9.w", rule="routed-expert",
    ...               found="9", expected="0..7 (num_experts=8)", fix="check num_experts"))
    "rule 'routed-expert': key 'x.experts.9.w': captured index out of range: found 9, expected 0..7 (num_experts=8). Fix: check num_experts"
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CheckpointError",
    "DecisionError",
    "IntegrityError",
    "MeshError",
    "OutputError",
    "OwnershipError",
    "RulesetError",
    "did_you_mean",
    "one_of",
    "short",
]


class OwnershipError(Exception):
    """Base class of every error this library raises on bad input.

    `code` is a short stable id of the kind of problem (`unknown-axis`, `index-out-of-range`, ...), the same id
    the linter reports it under.
    """

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        rule: str | None = None,
        key: str | None = None,
        found: str | None = None,
        expected: str | None = None,
        fix: str | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.message = message
        self.code = code or self.default_code
        self.detail = detail
        self.source = source
        self.rule = rule
        self.key = key
        self.found = found
        self.expected = expected
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source is not None:
            where.append(self.source)
        if self.rule is not None:
            where.append(f"rule {self.rule!r}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        text = ": ".join([*where, self.message])
        facts = []
        if self.found is not None:
            facts.append(f"found {self.found}")
        if self.expected is not None:
            facts.append(f"expected {self.expected}")
        if facts:
            text += ": " + ", ".join(facts)
        if self.fix is not None:
            text += f". Fix: {self.fix}"
        if self.detail is not None:
            text += "\n" + self.detail
        return text


class RulesetError(OwnershipError):
    """A rule file or ruleset is malformed: schema, pattern, layout, unknown axis or param."""

    default_code = "ruleset"


class DecisionError(OwnershipError):
    """A valid ruleset cannot decide a key: an index out of range, a shape that does not divide, an unmatched
    key under `default = "error"`, two keys with one local name on a rank."""

    default_code = "decision"


class MeshError(OwnershipError):
    """A mesh specification or a rank is invalid."""

    default_code = "bad-mesh"


class CheckpointError(OwnershipError):
    """A checkpoint cannot be listed or read: missing, truncated or corrupt files, unsafe pickles, bad selections."""

    default_code = "bad-checkpoint"


class OutputError(OwnershipError):
    """An output file cannot be written: its folder is read-only or missing, it is a folder, or it is a file of
    the checkpoint being read. Nothing is left behind."""

    default_code = "bad-output"


class IntegrityError(OwnershipError):
    """The ranks' loads, taken together, are not the checkpoint: a gap, disagreeing replicas, or a failed rank.

    `problems` holds one line per problem, each naming the key, its rule and the ranks concerned.
    """

    default_code = "integrity"

    def __init__(self, message: str, *, problems: Sequence[str] = (), **fields: Any) -> None:
        self.problems = list(problems)
        super().__init__(message, **fields)


def short(value: Any, *, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for the `found` of an error.

    Example:
        >>> short("x" * 100, limit=10)
        "'xxxxxx..."
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> list[str]:
    """The choices a user most likely meant by `word`: those equal but for case, else those one edit away
    (a letter changed, added, dropped, or two swapped), else difflib's closest; in the order given.

    Example:
        >>> did_you_mean("pt", ["pp", "tp", "ep"]), did_you_mean("EP", ["pp", "ep"]), did_you_mean("x", ["ep"])
        (['pp', 'tp'], ['ep'], [])
    """
    options = list(dict.fromkeys(choices))
    same_case = [c for c in options if c.lower() == word.lower()]
    if same_case:
        return same_case
    near = [c for c in options if _one_edit(word, c)]
    return near or difflib.get_close_matches(word, options, n=1)


def one_of(names: Sequence[str]) -> str:
    """`'a'`, `'a' or 'b'`, `'a', 'b' or 'c'`: the names a did-you-mean offers.

    Example:
        >>> one_of(["pp", "tp"])
        "'pp' or 'tp'"
    """
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _one_edit(a: str, b: str) -> bool:
    """Whether `b` is `a` with one letter changed, added or dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    shorter, longer = (a, b) if len(a) < len(b) else (b, a)
    return any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))
