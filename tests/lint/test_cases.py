"""Annotated case files: every built-in ruleset's cases pass, and wrong cases are reported, not hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from ownership import RulesetError, load_ruleset
from ownership.compile import BoundRuleset, RankRules
from ownership.lint.case_file import case_file_for, load_cases, parse_cases
from ownership.lint.cases import CaseFailure, RuleCount, run_cases
from ownership.ruleset import Ruleset
from ownership.spec.builtin import builtin_dir, builtin_names

CASE_FILES = sorted(builtin_dir().glob("*.cases.toml"))
KEY = "m.layers.0.mlp.experts.6.up_proj.lora_A.weight"


@pytest.fixture(scope="module")
def vllm() -> Ruleset:
    return load_ruleset("vllm-ep-lora")


def test_every_builtin_ruleset_has_a_case_file() -> None:
    assert sorted(path.name.removesuffix(".cases.toml") for path in CASE_FILES) == builtin_names()


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda path: path.name)
def test_builtin_case_file_passes(path: Path) -> None:
    ruleset = load_ruleset(path.name.removesuffix(".cases.toml"))
    assert case_file_for(ruleset.name) == path
    report = run_cases(ruleset, load_cases(path))
    assert [str(failure) for failure in report.failures] == []
    # Every rule its own file writes needs a case; inherited rules are checked by their own ruleset's cases.
    assert report.unexercised == [], "every rule of the ruleset needs a case"
    inherited = {rule.id for rule in ruleset.spec.rules} - ruleset.own_rules if ruleset.extends else set()
    assert report.inherited == inherited
    assert report.num_passed > 0 and report.ok


CASE = """
[[case]]
name = "uneven linear"
mesh = "ep=4"
params = {{ num_experts = 10 }}
[[case.expect]]
key = "m.layers.0.mlp.experts.6.up_proj.lora_A.weight"
rule = "{rule}"
owners = {owners}
"""

FUSED_B = """
[[case]]
name = "fused B"
mesh = "ep=4"
params = { num_experts = 6 }
[[case.expect]]
key = "m.experts.base_layer.lora_B.weight"
shape = [48, 24]
rule = "fused-expert-lora-b"
owners = "all"
selection = { 2 = [":", [[4, 23, 6]]], 3 = "[:, 5:23:6]" }
"""


def test_wrong_owners_is_a_failure(vllm: Ruleset) -> None:
    report = run_cases(vllm, parse_cases(CASE.format(rule="routed-expert", owners="[1]"), source="c.toml"))
    assert [str(failure) for failure in report.failures] == [
        f"uneven linear: {KEY}: owners: expected [1], found [2]"
    ]
    assert report.per_rule == {
        "routed-expert": RuleCount(0, 1),
        "fused-expert-lora-a": RuleCount(0, 0),
        "fused-expert-lora-b": RuleCount(0, 0),
    }
    assert report.unexercised == ["fused-expert-lora-a", "fused-expert-lora-b"]
    assert report.to_json()["failures"] == [
        {"case": "uneven linear", "key": KEY, "check": "owners", "expected": "[1]", "found": "[2]"}
    ]


def test_wrong_rule_and_selection_are_failures(vllm: Ruleset) -> None:
    report = run_cases(vllm, parse_cases(CASE.format(rule="<default>", owners='"all"'), source="c.toml"))
    assert report.failures == [CaseFailure("uneven linear", KEY, "rule", "'<default>'", "'routed-expert'")]
    # Rank 2 is right in the list form; rank 3's 5:23:6 stops one column short of 5:24:6.
    report = run_cases(vllm, parse_cases(FUSED_B, source="c.toml"))
    assert [str(failure) for failure in report.failures] == [
        "fused B: m.experts.base_layer.lora_B.weight: selection on rank 3: expected [:, 5:23:6], "
        "found [:, 5:24:6]"
    ]


def test_selections_compare_as_indices(vllm: Ruleset) -> None:
    # 4:23:6 and 4+10+16:23:6 name the same columns, as do 5:24:6 and 5+11:24:6.
    text = FUSED_B.replace('3 = "[:, 5:23:6]"', '3 = "[:, 5+11:24:6]"')
    text = text.replace("[[4, 23, 6]]", "[[4, 5, 1], [10, 11, 1], [16, 23, 6]]")
    assert run_cases(vllm, parse_cases(text, source="c.toml")).failures == []


def test_per_rank_decisions_must_agree_with_owners(vllm: Ruleset, monkeypatch: pytest.MonkeyPatch) -> None:
    # A decider that disowns rank 2's keys, while the whole-mesh view still gives them to rank 2.
    for_rank = BoundRuleset.for_rank

    def broken(self: BoundRuleset, rank: int) -> RankRules:
        rules = for_rank(self, rank)
        if rank == 2:
            decide = rules.decide
            rules.decide = lambda key, shape=None: decide(key, shape)._replace(owned=False, local_key=None)
        return rules

    monkeypatch.setattr(BoundRuleset, "for_rank", broken)
    report = run_cases(vllm, parse_cases(CASE.format(rule="routed-expert", owners="[2]"), source="c.toml"))
    assert [str(failure) for failure in report.failures] == [
        f"uneven linear: {KEY}: rank 2 decide: expected owned (rule 'routed-expert', local key {KEY!r}, "
        "selection all, captures {'expert': 6}), found not owned (rule 'routed-expert')"
    ]


def test_error_checks(vllm: Ruleset) -> None:
    text = """
[[case]]
name = "errors"
mesh = "ep=2"
params = { num_experts = 4 }
[[case.error]]
key = "m.experts.4.w"
code = "index-out-of-range"
message = "expected 0..3 (num_experts=4)"
[[case.error]]
key = "m.experts.3.w"
code = "index-out-of-range"
[[case.error]]
key = "m.experts.lora_A.weight"
shape = [9, 2]
rule = "fused-expert-lora-a"
message = "expected a multiple of expert=5"
"""
    report = run_cases(vllm, parse_cases(text, source="c.toml"))
    assert report.per_rule["routed-expert"] == RuleCount(1, 1)
    assert report.per_rule["fused-expert-lora-a"] == RuleCount(0, 1)
    assert [(f.key, f.check, f.expected) for f in report.failures] == [
        ("m.experts.3.w", "error", "error 'index-out-of-range'"),
        (
            "m.experts.lora_A.weight",
            "error",
            "an error with 'expected a multiple of expert=5' in its message from rule 'fused-expert-lora-a'",
        ),
    ]
    assert report.failures[0].found == "no error (owners [1])"
    assert report.failures[1].found.startswith(
        "error 'layout-mismatch': vllm-ep-lora.toml (built-in): rule 'fused-expert-lora-a': key "
        "'m.experts.lora_A.weight': dim (expert r) of layout '(expert r) in' does not fit the shape: found "
        "size 9, expected a multiple of expert=4."
    )


def test_unbindable_case_fails_its_checks(vllm: Ruleset) -> None:
    text = CASE.format(rule="routed-expert", owners="[2]").replace("= 10 }", "= 10, bogus = 1 }")
    report = run_cases(vllm, parse_cases(text, source="c.toml"))
    assert report.per_rule["routed-expert"] == RuleCount(0, 1)
    (failure,) = report.failures
    assert (failure.check, failure.expected) == ("bind", "the case's mesh and params to bind")
    assert failure.found.startswith("error 'unknown-param': ")


def test_unknown_rule_id_is_an_error(vllm: Ruleset) -> None:
    cases = parse_cases(CASE.format(rule="routed-experts", owners="[2]"), source="c.toml")
    with pytest.raises(RulesetError) as info:
        run_cases(vllm, cases)
    assert info.value.code == "unknown-rule"
    assert str(info.value) == (
        f"c.toml: case 'uneven linear': key {KEY!r}: rule 'routed-experts' is not a rule of 'vllm-ep-lora': "
        "found 'routed-experts', expected one of ['routed-expert', 'fused-expert-lora-a', "
        "'fused-expert-lora-b', '<default>']. Fix: correct the rule id in the case file "
        "(did you mean 'routed-expert'?)"
    )


def test_case_file_for_another_ruleset_is_an_error(vllm: Ruleset) -> None:
    text = 'ruleset = "other"\n' + CASE.format(rule="routed-expert", owners="[2]")
    with pytest.raises(RulesetError, match="the case file is for ruleset 'other', not 'vllm-ep-lora'"):
        run_cases(vllm, parse_cases(text, source="c.toml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            CASE.format(rule="r", owners="[2]").replace("owners =", "owner ="),
            f"c.toml: case 'uneven linear': expect key {KEY!r}: unknown field 'owner' (and 1 more problems): "
            "found 'owner', expected one of: key, local_key, owners, rule, selection, shape. "
            "Fix: correct its spelling (did you mean 'owners'?)\n"
            f"    also: case 'uneven linear': expect key {KEY!r}: missing field 'owners'",
        ),
        (
            '[[case]]\nname = "x"\nok = ["a"]\n',
            "c.toml: case 'x': missing required field 'mesh'. Fix: add 'mesh' (see docs/cases.md)",
        ),
        (
            CASE.format(rule="r", owners="[4]"),
            f"c.toml: case 'uneven linear': key {KEY!r}: ranks [4] are outside the mesh ep=4 "
            "(flat ranks 0..3). Fix: see docs/cases.md",
        ),
        (
            CASE.format(rule="r", owners='"two"'),
            f"c.toml: case 'uneven linear': expect key {KEY!r}: invalid value for 'owners': owners is a list "
            "of flat ranks (e.g. [0, 2], [] for nobody) or \"all\", not 'two': found 'two'. "
            "Fix: see docs/cases.md for the allowed forms",
        ),
        (
            CASE.format(rule="r", owners="[2]") + 'selection = { 2 = "[24:32, :]" }\n',
            f"c.toml: case 'uneven linear': expect key {KEY!r}: selection on rank 2 needs the tensor's "
            "`shape`. Fix: see docs/cases.md",
        ),
        (
            "case = 3",
            "c.toml: invalid value for 'case': Input should be a valid list: found 3. "
            "Fix: see docs/cases.md for the allowed forms",
        ),
        (
            "[[case",
            "c.toml: case file is not valid TOML: found Expected ']]' at the end of an array declaration "
            "(at end of document). Fix: fix the TOML syntax at that line",
        ),
    ],
)
def test_bad_case_file(text: str, message: str) -> None:
    with pytest.raises(RulesetError) as info:
        parse_cases(text, source="c.toml")
    assert (info.value.code, str(info.value)) == ("schema", message)


def test_case_file_for(vllm: Ruleset, tmp_path: Path) -> None:
    assert case_file_for("vllm-ep-lora") == builtin_dir() / "vllm-ep-lora.cases.toml" == case_file_for(vllm)
    rule_file = tmp_path / "moe.toml"
    rule_file.write_text((builtin_dir() / "vllm-ep-lora.toml").read_text())
    assert case_file_for(rule_file) == tmp_path / "moe.cases.toml" == case_file_for(load_ruleset(rule_file))
