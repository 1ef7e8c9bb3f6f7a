"""Running annotated cases: each check of a case file (`ownership.lint.case_file`) against a ruleset, counted
per rule.

`run_cases` checks each expected owner set, `ok` key and expected error on the whole-mesh view
(`BoundRuleset.owners`) and on every rank's own `for_rank(rank).decide`, which must agree with it. A case file that
names another ruleset, or a rule the ruleset does not have, is a `RulesetError` before anything runs; everything
else is a `CaseFailure` in the report.

Example:
    >>> from ownership import load_ruleset
    >>> from ownership.lint.case_file import parse_cases
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ownership.compile.bind import BoundRuleset
from ownership.compile.rank import RankRules
from ownership.errors import OwnershipError, RulesetError, did_you_mean, one_of
from ownership.lint.case_file import CaseFile, ExpectError, ExpectOwners
from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.selection import (
    DimSelection,
    Selection,
    dim_indices,
    parse_selection,
    selection_text,
)
from ownership.ruleset import Ruleset

__all__ = ["CaseFailure", "CaseReport", "RuleCount", "run_cases"]


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
                close = did_you_mean(rule, known)
                hint = f" (did you mean {one_of(close)}?)" if close else ""
                raise RulesetError(
                    f"case {case.name!r}: key {key!r}: rule {rule!r} is not a rule of {ruleset.name!r}",
                    source=source,
                    found=repr(rule),
                    expected=f"one of {known}",
                    fix=f"correct the rule id in the case file{hint}",
                    code="unknown-rule",
                )


def _check_expect(
    case: str, bound: BoundRuleset, ranks: Sequence[RankRules], expect: ExpectOwners
) -> CaseFailure | None:
    key = expect.key
    shape = None if expect.shape is None else tuple(expect.shape)
    rule = bound.rule_id(key)
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
    rule = bound.rule_id(key)
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
    rule = item.rule or bound.rule_id(key)
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
