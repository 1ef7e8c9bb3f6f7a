"""Annotated cases: keys with a mesh and params, and what a ruleset must decide for each, checked per rule.

A case file (`NAME.cases.toml` beside the rule file; format in docs/cases.md) holds cases. A case fixes a
mesh, params and optionally a config, and lists checks on keys:

- `[[case.expect]]`: the rule that must decide the key, the exact set of owning ranks, and optionally the
  selection and local key on some ranks;
- `ok`: keys that no rule may match (they fall to the ruleset's `default`);
- `[[case.error]]`: keys that must fail, with the error's code and/or a part of its message.

`run_cases` checks each on the whole-mesh view (`BoundRuleset.owners`) and on every rank's own
`for_rank(rank).decide`, which must agree with it, and counts passed and failed checks per rule. A case file
that does not parse, or names a rule the ruleset does not have, is a `RulesetError` before anything runs.

Example:
    >>> from ownership import load_ruleset
    >>> cases = parse_cases('''
    ... [[case]]
    ... name = "uneven linear"
    ... mesh = "ep=4"
    ... params = { num_experts = 10 }
    ... ok = ["m.layers.0.self_attn.q_proj.lora_A.weight"]
    ... [[case.expect]]
    ... key = "m.layers.0.mlp.experts.6.up_proj.lora_A.weight"
    ... rule = "routed-expert"
    ... owners = [1]
    ... ''', source="demo.cases.toml")
    >>> report = run_cases(load_ruleset("vllm-ep-lora"), cases)
    >>> report.per_rule["routed-expert"], report.per_rule["<default>"]
    (RuleCount(passed=0, failed=1), RuleCount(passed=1, failed=0))
    >>> print(report.failures[0])
    uneven linear: m.layers.0.mlp.experts.6.up_proj.lora_A.weight: owners: expected [1], found [2]
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ownership.builtin import builtin_dir
from ownership.compile import BoundRuleset, RankRules
from ownership.decision import DEFAULT_RULE, Decision
from ownership.errors import MeshError, OwnershipError, RulesetError
from ownership.mesh import Mesh
from ownership.render import print_json, print_table, selection_text
from ownership.ruleset import Ruleset, load_ruleset
from ownership.selection import DimSelection, Run, Selection, dim_indices
from ownership.spec import load_toml

__all__ = [
    "Case",
    "CaseFailure",
    "CaseFile",
    "CaseReport",
    "ExpectError",
    "ExpectOwners",
    "RuleCount",
    "add_test_command",
    "case_file_for",
    "load_cases",
    "main_test",
    "parse_cases",
    "parse_selection",
    "print_report",
    "run_cases",
]

ALL = "all"


# -- selections as written in case files ---------------------------------------------------------------------

_INT = r"\s*(-?\d+)\s*"
_RUN = re.compile(rf"{_INT}(?::{_INT}(?::{_INT})?)?\Z")


def parse_selection(value: Any) -> Selection:
    """A selection from its case-file form: slice text as `ownership explain` prints it, or plan JSON's form.

    Text: `all`, or `[dim, dim, ...]` where a dim is `:` (whole) or runs joined by `+`, each `i`, `a:b` or
    `a:b:step`. List: one item per dim, `":"` (whole; TOML has no null) or a list of `[start, stop, step]`.
    A malformed value is a `ValueError` saying what was expected.

        >>> parse_selection("[:, 4:23:6+1]")
        (None, ((4, 23, 6), (1, 2, 1)))
        >>> parse_selection([[[24, 32, 1]], ":"]) == parse_selection("[24:32, :]")
        True
    """
    if isinstance(value, str):
        return _parse_selection_text(value)
    if isinstance(value, list):
        return tuple(_parse_dim_list(item) for item in value)
    raise ValueError(f"a selection is slice text such as '[0:8, :]' or a list of dims, not {value!r}")


def _parse_selection_text(text: str) -> Selection:
    body = text.strip()
    if body == ALL:
        return None
    if not (body.startswith("[") and body.endswith("]")) or not body[1:-1].strip():
        raise ValueError(f"selection {text!r} is not `all` or `[dim, ...]` (e.g. '[0:8, :]')")
    return tuple(_parse_dim_text(dim, text) for dim in body[1:-1].split(","))


def _parse_dim_text(dim: str, text: str) -> DimSelection:
    if dim.strip() == ":":
        return None
    runs: list[Run] = []
    for piece in dim.split("+"):
        m = _RUN.match(piece)
        if m is None:
            raise ValueError(f"selection {text!r}: cannot read {piece.strip()!r}; write i, a:b or a:b:step")
        start, stop, step = m.groups()
        first = int(start)
        runs.append((first, first + 1 if stop is None else int(stop), 1 if step is None else int(step)))
    return _checked_runs(runs, repr(text))


def _parse_dim_list(item: Any) -> DimSelection:
    if item == ":":
        return None
    if isinstance(item, list) and all(
        isinstance(run, list) and len(run) == 3 and all(type(x) is int for x in run) for run in item
    ):
        return _checked_runs([(run[0], run[1], run[2]) for run in item], repr(item))
    raise ValueError(f'a dim of a selection list is ":" or a list of [start, stop, step] runs, not {item!r}')


def _checked_runs(runs: list[Run], text: str) -> tuple[Run, ...]:
    for start, _, step in runs:
        if start < 0 or step < 1:
            raise ValueError(f"selection {text}: runs need start >= 0 and step >= 1")
    return tuple(runs)


# -- the file format -----------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _owners_form(value: Any) -> Any:
    # Checked before pydantic's union validation, so a bad value gets one clear message, not one per member.
    if value == ALL or (isinstance(value, list) and all(type(r) is int and r >= 0 for r in value)):
        return value
    raise ValueError(f'owners is a list of flat ranks (e.g. [0, 2], [] for nobody) or "all", not {value!r}')


def _per_rank_form(value: Any) -> Any:
    if isinstance(value, dict):
        for rank in value:
            if not (isinstance(rank, str) and rank.isdigit()):
                raise ValueError(f"per-rank tables are keyed by flat rank (e.g. {{ 2 = ... }}), not {rank!r}")
    return value


def _selection_form(value: Any) -> Any:
    if isinstance(value, dict):
        for selection in value.values():
            parse_selection(selection)
    return value


class ExpectOwners(_Strict):
    """`[[case.expect]]`: a key, the rule that must decide it and exactly who owns it."""

    key: str
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    rule: str
    owners: Annotated[list[int] | Literal["all"], BeforeValidator(_owners_form)]
    selection: Annotated[
        dict[str, Any], BeforeValidator(_per_rank_form), BeforeValidator(_selection_form)
    ] = Field(default_factory=dict)
    local_key: Annotated[dict[str, str], BeforeValidator(_per_rank_form)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ExpectOwners:
        listed = self.listed_owners()
        if listed is not None and len(set(listed)) != len(listed):
            raise ValueError(f"owners {listed} lists a rank twice")
        for rank, value in self.selection.items():
            if listed is not None and int(rank) not in listed:
                raise ValueError(f"selection given for rank {rank}, which is not in owners {listed}")
            selection = parse_selection(value)
            if selection is not None and self.shape is None:
                raise ValueError(f"selection on rank {rank} needs the tensor's `shape`")
            if selection is not None and self.shape is not None and len(selection) != len(self.shape):
                raise ValueError(
                    f"selection on rank {rank} has {len(selection)} dims, the shape {self.shape} has "
                    f"{len(self.shape)}"
                )
        for rank in self.local_key:
            if listed is not None and int(rank) not in listed:
                raise ValueError(f"local_key given for rank {rank}, which is not in owners {listed}")
        return self

    def listed_owners(self) -> list[int] | None:
        """The owners as written, or None for `"all"`."""
        return None if isinstance(self.owners, str) else self.owners

    def expected_owners(self, num_ranks: int) -> list[int]:
        """The owning ranks, sorted, on a mesh of `num_ranks`."""
        listed = self.listed_owners()
        return list(range(num_ranks)) if listed is None else sorted(listed)


class ExpectError(_Strict):
    """`[[case.error]]`: a key that must fail with this error `code` and/or a `message` holding this text."""

    key: str
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    code: str | None = None
    message: str | None = None
    rule: str | None = None

    @model_validator(mode="after")
    def _something_to_check(self) -> ExpectError:
        if self.code is None and self.message is None:
            raise ValueError("an error check needs `code`, `message` or both")
        return self


class Case(_Strict):
    """`[[case]]`: a mesh, params (and a config to read params from), and the checks made under them."""

    name: str
    mesh: str
    params: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
    expect: list[ExpectOwners] = Field(default_factory=list)
    ok: list[str] = Field(default_factory=list)
    error: list[ExpectError] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits_mesh(self) -> Case:
        try:
            num_ranks = Mesh.parse(self.mesh).num_ranks
        except MeshError as error:
            raise ValueError(f"bad mesh: {error}") from None
        if not (self.expect or self.ok or self.error):
            raise ValueError("the case checks nothing: add [[case.expect]], ok or [[case.error]]")
        for expect in self.expect:
            ranks = [
                *(expect.listed_owners() or []),
                *map(int, expect.selection),
                *map(int, expect.local_key),
            ]
            outside = sorted({r for r in ranks if r >= num_ranks})
            if outside:
                raise ValueError(
                    f"key {expect.key!r}: ranks {outside} are outside the mesh {self.mesh} "
                    f"(flat ranks 0..{num_ranks - 1})"
                )
        return self


class _CaseFileSpec(_Strict):
    ruleset: str | None = None
    cases: list[Case] = Field(alias="case", min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> _CaseFileSpec:
        names = [case.name for case in self.cases]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"case names must be unique; given more than once: {twice}")
        return self


@dataclass(frozen=True)
class CaseFile:
    """A parsed case file: where it came from, the ruleset it names (if any), and its cases in order."""

    source: str
    ruleset: str | None
    cases: tuple[Case, ...]


_FIELDS: dict[str, type[BaseModel]] = {
    "file": _CaseFileSpec,
    "case": Case,
    "expect": ExpectOwners,
    "error": ExpectError,
}


def parse_cases(text: str, *, source: str = "<cases>") -> CaseFile:
    """Parse case-file TOML; every problem is a `RulesetError` naming `source`, the case and the field.

    >>> try:
    ...     parse_cases('[[case]]\\nname = "x"\\nmesh = "ep=2"\\nowners = [0]\\n', source="c.toml")
    ... except RulesetError as error:
    ...     print(error.source, error.message, error.expected, sep="\\n")
    c.toml
    case 'x': unknown field 'owners'
    one of: config, error, expect, mesh, name, ok, params
    """
    data = load_toml(text, source=source, what="case file")
    try:
        spec = _CaseFileSpec.model_validate(data)
    except ValidationError as error:
        raise _explain(error, data, source) from None
    return CaseFile(source=source, ruleset=spec.ruleset, cases=tuple(spec.cases))


def load_cases(path: str | os.PathLike[str]) -> CaseFile:
    """Read and parse a case file; messages name it by `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RulesetError(
            "cannot read case file",
            source=str(path),
            found=error.strerror,
            fix="check the path, or write one (docs/cases.md)",
            code="no-case-file",
        ) from None
    return parse_cases(text, source=str(path))


def _explain(error: ValidationError, data: Any, source: str) -> RulesetError:
    """pydantic's first complaint as one error naming the case, the item's key and the field."""
    # A misspelled field is also a missing one: name the unknown field, which says what to fix.
    problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
    first = problems[0]
    loc = tuple(first["loc"])
    where: list[str] = []
    model = "file"
    rest: tuple[Any, ...] = loc
    if len(loc) >= 2 and loc[0] == "case" and isinstance(loc[1], int):
        case = _item(data, "case", loc[1])
        where.append(f"case {case.get('name', f'#{loc[1] + 1}')!r}")
        model, rest = "case", loc[2:]
        if len(rest) >= 2 and rest[0] in ("expect", "error") and isinstance(rest[1], int):
            item = _item(case, str(rest[0]), rest[1])
            label = f"key {item['key']!r}" if isinstance(item.get("key"), str) else f"#{rest[1] + 1}"
            where.append(f"{rest[0]} {label}")
            model, rest = str(rest[0]), rest[2:]
    field_path = ".".join(str(part) for part in rest) or None
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    prefix = ": ".join(where) + ": " if where else ""
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(info.alias or name for name, info in _FIELDS[model].model_fields.items()))
        return RulesetError(
            f"{prefix}unknown field {field_path!r}{more}",
            source=source,
            found=repr(loc[-1]),
            expected=f"one of: {allowed}",
            fix="remove the field or correct its spelling",
            code="schema",
        )
    if first["type"] == "missing":
        return RulesetError(
            f"{prefix}missing required field {field_path!r}{more}",
            source=source,
            fix=f"add {loc[-1]!r} (see docs/cases.md)",
            code="schema",
        )
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "value_error" and field_path is None:
        return RulesetError(f"{prefix}{message}{more}", source=source, fix="see docs/cases.md", code="schema")
    return RulesetError(
        f"{prefix}invalid value for {field_path or 'the file'!r}: {message}{more}",
        source=source,
        found=_short(first.get("input")),
        fix="see docs/cases.md for the allowed forms",
        code="schema",
    )


def _item(data: Any, name: str, index: int) -> dict[str, Any]:
    items = data.get(name) if isinstance(data, dict) else None
    item = items[index] if isinstance(items, list) and index < len(items) else None
    return item if isinstance(item, dict) else {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def case_file_for(ruleset: str | os.PathLike[str] | Ruleset) -> Path:
    """Where a ruleset's case file is: `NAME.cases.toml` in the built-in folder for a built-in name, or beside
    the rule file for a path (`my/rules.toml` -> `my/rules.cases.toml`). The file may not exist.

        >>> case_file_for("vllm-ep-lora").name, case_file_for("my/moe.toml").as_posix()
        ('vllm-ep-lora.cases.toml', 'my/moe.cases.toml')
    """
    if isinstance(ruleset, Ruleset):
        # `load_ruleset` names a built-in's source "NAME.toml (built-in)", and a file's by its path.
        ruleset = ruleset.source.removesuffix(".toml (built-in)")
    path = Path(ruleset)
    # The same test as `load_ruleset`: a name is a built-in unless it looks like a path.
    if path.suffix == ".toml" or path.exists() or os.sep in str(ruleset):
        return path.with_name(f"{path.name.removesuffix('.toml')}.cases.toml")
    return builtin_dir() / f"{ruleset}.cases.toml"


# -- running -------------------------------------------------------------------------------------------------


class RuleCount(NamedTuple):
    """Checks that passed and failed for one rule."""

    passed: int = 0
    failed: int = 0


class CaseFailure(NamedTuple):
    """One failed check: the case, the key, what was checked, what was expected and what was found."""

    case: str
    key: str
    check: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.case}: {self.key}: {self.check}: expected {self.expected}, found {self.found}"

    def to_json(self) -> dict[str, str]:
        return {
            "case": self.case,
            "key": self.key,
            "check": self.check,
            "expected": self.expected,
            "found": self.found,
        }


@dataclass
class CaseReport:
    """The outcome of a case file: checks passed and failed per rule id (every rule of the ruleset, in file
    order, then `<default>` when checked), and the failures in file order."""

    ruleset: str
    source: str
    per_rule: dict[str, RuleCount] = field(default_factory=dict)
    failures: list[CaseFailure] = field(default_factory=list)
    inherited: frozenset[str] = frozenset()
    """Rules the ruleset takes unchanged from one it extends: their own ruleset's cases check them."""

    @property
    def num_passed(self) -> int:
        return sum(count.passed for count in self.per_rule.values())

    @property
    def num_failed(self) -> int:
        return sum(count.failed for count in self.per_rule.values())

    @property
    def ok(self) -> bool:
        return self.num_failed == 0

    @property
    def unexercised(self) -> list[str]:
        """Rules of the ruleset that no check names or reaches."""
        return [
            rule
            for rule, count in self.per_rule.items()
            if count == (0, 0) and rule != DEFAULT_RULE and rule not in self.inherited
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "ruleset": self.ruleset,
            "cases": self.source,
            "passed": self.num_passed,
            "failed": self.num_failed,
            "per_rule": {rule: count._asdict() for rule, count in self.per_rule.items()},
            "unexercised": self.unexercised,
            "failures": [failure.to_json() for failure in self.failures],
        }

    def _record(self, rule: str, failure: CaseFailure | None) -> None:
        passed, failed = self.per_rule.get(rule, RuleCount())
        self.per_rule[rule] = RuleCount(passed + (failure is None), failed + (failure is not None))
        if failure is not None:
            self.failures.append(failure)


def run_cases(ruleset: Ruleset, cases: CaseFile, *, source: str | None = None) -> CaseReport:
    """Run every check of `cases` against `ruleset` and count them per rule (example: the module's).

    Before anything runs, a case file naming another ruleset (`ruleset = ...`) or a rule id that `ruleset`
    does not have is a `RulesetError`. A case whose mesh or params do not bind fails each of its checks;
    everything else is a `CaseFailure` in the report, never an exception. `source` overrides how messages name
    the case file.
    """
    source = source or cases.source
    rule_ids = [rule.id for rule in ruleset.spec.rules]
    _check_names(ruleset, cases, rule_ids, source)
    inherited = frozenset(rule_ids) - ruleset.own_rules if ruleset.extends else frozenset()
    report = CaseReport(
        ruleset=ruleset.name,
        source=source,
        per_rule={rule: RuleCount() for rule in rule_ids},
        inherited=inherited,
    )
    for case in cases.cases:
        try:
            bound = ruleset.bind(mesh=case.mesh, params=case.params, config=case.config)
        except OwnershipError as error:
            found = _error_text(error)
            expected = "the case's mesh and params to bind"
            for expect in case.expect:
                report._record(expect.rule, CaseFailure(case.name, expect.key, "bind", expected, found))
            for key in case.ok:
                report._record(DEFAULT_RULE, CaseFailure(case.name, key, "bind", expected, found))
            for item in case.error:
                rule = item.rule or DEFAULT_RULE
                report._record(rule, CaseFailure(case.name, item.key, "bind", expected, found))
            continue
        ranks = [bound.for_rank(rank) for rank in bound.mesh.ranks()]
        for expect in case.expect:
            report._record(expect.rule, _check_expect(case.name, bound, ranks, expect))
        for key in case.ok:
            report._record(DEFAULT_RULE, _check_ok(case.name, bound, ranks, key))
        for item in case.error:
            rule, failure = _check_error(case.name, bound, ranks, item)
            report._record(rule, failure)
    return report


def _check_names(ruleset: Ruleset, cases: CaseFile, rule_ids: list[str], source: str) -> None:
    if cases.ruleset is not None and cases.ruleset != ruleset.name:
        raise RulesetError(
            f"the case file is for ruleset {cases.ruleset!r}, not {ruleset.name!r}",
            source=source,
            found=repr(cases.ruleset),
            expected=repr(ruleset.name),
            fix=f"pass the case file of {ruleset.name!r}, or correct `ruleset` at the top of this one",
            code="ruleset-mismatch",
        )
    known = [*rule_ids, DEFAULT_RULE]
    for case in cases.cases:
        named = [(e.key, e.rule) for e in case.expect] + [(e.key, e.rule) for e in case.error if e.rule]
        for key, rule in named:
            if rule not in known:
                close = difflib.get_close_matches(rule, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RulesetError(
                    f"case {case.name!r}: key {key!r}: rule {rule!r} is not a rule of {ruleset.name!r}",
                    source=source,
                    found=repr(rule),
                    expected=f"one of {known}",
                    fix=f"correct the rule id in the case file{hint}",
                    code="unknown-rule",
                )


def _matched_rule(bound: BoundRuleset, key: str) -> str:
    m = bound.match(key)
    return DEFAULT_RULE if m is None else bound.by_group[m.lastgroup].id


def _check_expect(
    case: str, bound: BoundRuleset, ranks: Sequence[RankRules], expect: ExpectOwners
) -> CaseFailure | None:
    key = expect.key
    shape = None if expect.shape is None else tuple(expect.shape)
    rule = _matched_rule(bound, key)
    if rule != expect.rule:
        return CaseFailure(case, key, "rule", repr(expect.rule), repr(rule))
    expected_owners = expect.expected_owners(len(ranks))
    try:
        owner_list = bound.owners(key, shape)
    except OwnershipError as error:
        return CaseFailure(case, key, "owners", str(expected_owners), _error_text(error))
    # Sorted with repeats: a rank listed twice is a failure, not hidden by a dict.
    found_owners = sorted(rank for rank, _ in owner_list)
    if found_owners != expected_owners:
        return CaseFailure(case, key, "owners", str(expected_owners), str(found_owners))
    owners = dict(owner_list)
    disagreement = _agreement(case, key, shape, rule, owners, ranks)
    if disagreement is not None:
        return disagreement
    for rank_text, value in expect.selection.items():
        wanted, found = parse_selection(value), owners[int(rank_text)].selection
        if not _same_selection(wanted, found, shape):
            check = f"selection on rank {rank_text}"
            return CaseFailure(case, key, check, selection_text(wanted), selection_text(found))
    for rank_text, local_key in expect.local_key.items():
        found_key = owners[int(rank_text)].local_key
        if found_key != local_key:
            return CaseFailure(case, key, f"local key on rank {rank_text}", repr(local_key), repr(found_key))
    return None


def _check_ok(case: str, bound: BoundRuleset, ranks: Sequence[RankRules], key: str) -> CaseFailure | None:
    rule = _matched_rule(bound, key)
    if rule != DEFAULT_RULE:
        expected = f"no rule to match (the default, {bound.default})"
        return CaseFailure(case, key, "ok", expected, f"rule {rule!r} matches")
    if bound.default == "error":
        return None  # every rank raises unmatched-key: nothing to compare
    return _agreement(case, key, None, rule, dict(bound.owners(key)), ranks)


def _check_error(
    case: str, bound: BoundRuleset, ranks: Sequence[RankRules], item: ExpectError
) -> tuple[str, CaseFailure | None]:
    """The rule the check counts for (the given one, else the matching one) and the failure, if any."""
    key = item.key
    shape = None if item.shape is None else tuple(item.shape)
    rule = item.rule or _matched_rule(bound, key)
    expected = _expected_error_text(item)
    try:
        owners = bound.owners(key, shape)
    except OwnershipError as error:
        if not _error_fits(error, item):
            return rule, CaseFailure(case, key, "error", expected, _error_text(error))
    else:
        found = f"no error (owners {[rank for rank, _ in owners]})"
        return rule, CaseFailure(case, key, "error", expected, found)
    # A rank that does not own the key may decide so without looking at the shape; one that decides must fail.
    for rank in ranks:
        check = f"rank {rank.rank} decide"
        try:
            decision = rank.decide(key, shape)
        except OwnershipError as error:
            if not _error_fits(error, item):
                return rule, CaseFailure(case, key, check, expected, _error_text(error))
            continue
        if decision.owned:
            return rule, CaseFailure(case, key, check, expected, _describe(decision))
    return rule, None


def _agreement(
    case: str,
    key: str,
    shape: tuple[int, ...] | None,
    rule: str,
    owners: Mapping[int, Decision],
    ranks: Sequence[RankRules],
) -> CaseFailure | None:
    """Each rank's own decision must be the whole-mesh view's: not owned (same rule), or the same decision."""
    for rank in ranks:
        expected = owners.get(rank.rank)
        check = f"rank {rank.rank} decide"
        want = _describe(expected) if expected is not None else f"not owned (rule {rule!r})"
        try:
            decision = rank.decide(key, shape)
        except OwnershipError as error:
            return CaseFailure(case, key, check, want, _error_text(error))
        if expected is None:
            if decision.owned or decision.rule != rule:
                return CaseFailure(case, key, check, want, _describe(decision))
        elif decision != expected:
            return CaseFailure(case, key, check, want, _describe(decision))
    return None


def _same_selection(wanted: Selection, found: Selection, shape: tuple[int, ...] | None) -> bool:
    # Compared as index lists, so any runs that name the same indices in the same order are equal.
    if shape is None:
        return wanted == found
    return _indices(wanted, shape) == _indices(found, shape)


def _indices(selection: Selection, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    dims: Sequence[DimSelection] = selection if selection is not None else (None,) * len(shape)
    return tuple(tuple(dim_indices(dim, size)) for dim, size in zip(dims, shape, strict=True))


def _describe(decision: Decision) -> str:
    if not decision.owned:
        return f"not owned (rule {decision.rule!r})"
    return (
        f"owned (rule {decision.rule!r}, local key {decision.local_key!r}, "
        f"selection {selection_text(decision.selection)}, captures {dict(decision.captures)})"
    )


def _error_fits(error: OwnershipError, item: ExpectError) -> bool:
    return (
        (item.code is None or error.code == item.code)
        and (item.message is None or item.message in str(error))
        and (item.rule is None or error.rule == item.rule)
    )


def _expected_error_text(item: ExpectError) -> str:
    parts = [f"error {item.code!r}" if item.code else "an error"]
    if item.message is not None:
        parts.append(f"with {item.message!r} in its message")
    if item.rule is not None:
        parts.append(f"from rule {item.rule!r}")
    return " ".join(parts)


def _error_text(error: OwnershipError) -> str:
    return f"error {error.code!r}: {error}"


# -- the command ---------------------------------------------------------------------------------------------


def print_report(report: CaseReport) -> None:
    """The text report: a table of checks per rule, each failure on its own lines, then a summary line."""
    print_table(
        ["rule", "passed", "failed"],
        [
            [rule, str(count.passed), str(count.failed)]
            for rule, count in report.per_rule.items()
            if count != (0, 0) or rule not in report.inherited
        ],
        align_right={1, 2},
    )
    for failure in report.failures:
        print(f"FAILED {failure.case}: {failure.key}")
        print(f"  {failure.check}: expected {failure.expected}")
        print(f"  {' ' * len(failure.check)}  found    {failure.found}")
    if report.unexercised:
        print(f"rules without a check: {', '.join(report.unexercised)}")
    print(f"{report.ruleset}: {report.num_passed} passed, {report.num_failed} failed ({report.source})")


def main_test(args: argparse.Namespace) -> int:
    """`ownership test RULESET [--cases FILE] [--format text|json]`: run a ruleset's case file.

    `args` has `ruleset` (a built-in name or a rule file path), `cases` (a path, or None for
    `case_file_for(ruleset)`) and `format`. Prints the report and returns 0 when every check passes, 1 when
    one fails, and 2 (the error on stderr) when the ruleset or the case file cannot be used.

        $ ownership test vllm-ep-lora --format json   # main_test(Namespace(ruleset="vllm-ep-lora", ...))
    """
    try:
        ruleset = load_ruleset(args.ruleset)
        path = Path(args.cases) if getattr(args, "cases", None) else case_file_for(args.ruleset)
        if not path.is_file():
            raise RulesetError(
                f"no case file for ruleset {ruleset.name!r}",
                source=str(path),
                found="no such file",
                fix="write one (docs/cases.md), or pass --cases FILE",
                code="no-case-file",
            )
        report = run_cases(ruleset, load_cases(path))
    except OwnershipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if getattr(args, "format", "text") == "json":
        print_json(report.to_json())
    else:
        print_report(report)
    return 0 if report.ok else 1


def add_test_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `test` on a command line's subparsers, handled by `main_test`; returns its parser."""
    parser = subparsers.add_parser(
        "test",
        help="run a ruleset's annotated cases (exit 1 on failures)",
        description="Check a ruleset against its case file: the owners, selection and local key of each key.",
    )
    parser.add_argument("ruleset", help="built-in ruleset name or rule file path")
    parser.add_argument(
        "--cases",
        type=Path,
        help="case file (default: NAME.cases.toml beside the rule file; built-ins in rules/)",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.set_defaults(handler=main_test)
    return parser
