"""Annotated cases: keys with the mesh, params and the owners (and selections) each must get, run per rule.

A case file (`rules/NAME.cases.toml` beside a ruleset) holds cases; each case fixes a mesh and params and lists
expectations: a key (with its shape when the rule needs one), the rule that must decide it, the exact set of
owning ranks, and optionally the selection or local name on some ranks. `ok` keys must be matched by no rule.
`error` items must fail with a given code. Every expectation is checked on the whole-mesh view (`owners`) and on
each rank's own `decide`, which must agree.

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
    ... owners = [2]
    ... ''', source="demo.cases.toml")
    >>> report = run_cases(load_ruleset("vllm-ep-lora"), cases)
    >>> report.num_failed, report.per_rule["routed-expert"]
    (0, [1, 0])
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ownership.builtin import builtin_dir
from ownership.decision import DEFAULT_RULE
from ownership.errors import OwnershipError, RulesetError
from ownership.render import selection_text
from ownership.ruleset import Ruleset

__all__ = ["CaseFile", "CaseReport", "case_file_for", "load_cases", "parse_cases", "run_cases"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Strict):
    """One key and what the ruleset must do with it."""

    key: str
    shape: list[int] | None = None
    rule: str
    owners: list[int]
    selection: dict[str, str] = Field(default_factory=dict, description="rank -> selection in slice notation")
    local_key: dict[str, str] = Field(default_factory=dict, description="rank -> local key")


class ExpectError(_Strict):
    """A key that must fail to be decided, with the error's code."""

    key: str
    shape: list[int] | None = None
    code: str


class Case(_Strict):
    name: str
    mesh: str
    params: dict[str, Any] = Field(default_factory=dict)
    expect: list[Expect] = Field(default_factory=list)
    ok: list[str] = Field(default_factory=list)
    error: list[ExpectError] = Field(default_factory=list)


class CaseFile(_Strict):
    ruleset: str | None = None
    case: list[Case]


@dataclass
class CaseReport:
    """Per rule `[passed, failed]`, and one line per failure."""

    per_rule: dict[str, list[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def num_failed(self) -> int:
        return len(self.failures)

    def _count(self, rule: str, ok: bool) -> None:
        self.per_rule.setdefault(rule, [0, 0])[0 if ok else 1] += 1


def parse_cases(text: str, *, source: str) -> CaseFile:
    """Parse a case file; unknown fields and bad values are `RulesetError`s naming the file and the case."""
    try:
        return CaseFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        raise RulesetError(
            "case file is not valid TOML", source=source, found=str(error), code="schema"
        ) from None
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise RulesetError(
            f"bad case file field {where!r}: {problem['msg']}",
            source=source,
            fix="see docs/cases.md for the case file format",
            code="schema",
        ) from None


def load_cases(path: str | Path) -> CaseFile:
    path = Path(path)
    return parse_cases(path.read_text(encoding="utf-8"), source=str(path))


def case_file_for(ruleset: Ruleset) -> Path:
    """`NAME.cases.toml` beside the rule file (the built-in folder for built-ins)."""
    source = Path(ruleset.source.removesuffix(" (built-in)"))
    folder = source.parent if source.parent != Path() else builtin_dir()
    return folder / f"{ruleset.name}.cases.toml"


def run_cases(ruleset: Ruleset, cases: CaseFile, *, source: str = "<cases>") -> CaseReport:
    """Check every expectation; a case naming a rule the ruleset lacks is a `RulesetError` before anything runs."""
    known = {rule.id for rule in ruleset.spec.rules} | {DEFAULT_RULE}
    for case in cases.case:
        for expect in case.expect:
            if expect.rule not in known:
                raise RulesetError(
                    f"case {case.name!r} names rule {expect.rule!r}, which the ruleset does not have",
                    source=source,
                    key=expect.key,
                    expected=f"one of {sorted(known)}",
                    fix="correct the rule id in the case file",
                    code="unknown-rule",
                )
    report = CaseReport()
    for case in cases.case:
        bound = ruleset.bind(mesh=case.mesh, params=case.params)
        for expect in case.expect:
            problem = _check_expect(bound, expect)
            report._count(expect.rule, problem is None)
            if problem is not None:
                report.failures.append(f"{case.name}: {expect.key}: {problem}")
        for key in case.ok:
            owners = bound.owners(key)
            rules = {decision.rule for _, decision in owners}
            ok = bound.match(key) is None
            report._count(DEFAULT_RULE, ok)
            if not ok:
                report.failures.append(
                    f"{case.name}: {key}: expected no rule to match, found rule {sorted(rules)}"
                )
        for item in case.error:
            try:
                bound.owners(item.key, item.shape)
                found = "no error"
            except OwnershipError as error:
                found = error.code or type(error).__name__
            report._count("<error>", found == item.code)
            if found != item.code:
                report.failures.append(
                    f"{case.name}: {item.key}: expected error {item.code!r}, found {found}"
                )
    return report


def _check_expect(bound: Any, expect: Expect) -> str | None:
    shape = tuple(expect.shape) if expect.shape is not None else None
    try:
        owners = dict(bound.owners(expect.key, shape))
    except OwnershipError as error:
        return f"raised {error.code}: {error.message}"
    rules = {decision.rule for decision in owners.values()}
    if owners and rules != {expect.rule}:
        return f"expected rule {expect.rule!r}, found {sorted(rules)}"
    if sorted(owners) != sorted(expect.owners):
        return f"expected owners {sorted(expect.owners)}, found {sorted(owners)}"
    for rank in range(bound.mesh.num_ranks):
        decision = bound.for_rank(rank).decide(expect.key, shape)
        if decision.owned != (rank in owners) or (decision.owned and decision != owners[rank]):
            return f"rank {rank}'s own decision disagrees with the whole-mesh view"
    for rank_text, selection in expect.selection.items():
        found = selection_text(owners[int(rank_text)].selection) if int(rank_text) in owners else "not owned"
        if found != selection:
            return f"expected selection {selection} on rank {rank_text}, found {found}"
    for rank_text, local_key in expect.local_key.items():
        found_key = owners[int(rank_text)].local_key if int(rank_text) in owners else "not owned"
        if found_key != local_key:
            return f"expected local key {local_key!r} on rank {rank_text}, found {found_key!r}"
    return None
