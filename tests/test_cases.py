"""Annotated case files: every built-in ruleset's cases pass, and a wrong expectation is reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from ownership import RulesetError, load_ruleset
from ownership.builtin import builtin_dir, builtin_names
from ownership.cases import case_file_for, load_cases, parse_cases, run_cases
from ownership.cli import main


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_case_files_pass(name: str) -> None:
    ruleset = load_ruleset(name)
    path = case_file_for(ruleset)
    assert path.parent == builtin_dir() and path.is_file(), "every built-in ruleset ships a case file"
    report = run_cases(ruleset, load_cases(path))
    assert report.failures == []
    exercised = {rule for rule, (passed, _) in report.per_rule.items() if passed}
    assert {rule.id for rule in ruleset.spec.rules} <= exercised, "every rule has a case"


CASE = """
[[case]]
name = "demo"
mesh = "ep=4"
params = {{ num_experts = 10 }}
[[case.expect]]
key = "m.layers.0.mlp.experts.6.up_proj.lora_A.weight"
rule = "{rule}"
owners = [{owner}]
"""


def test_wrong_expectation_is_a_failure() -> None:
    report = run_cases(
        load_ruleset("vllm-ep-lora"), parse_cases(CASE.format(rule="routed-expert", owner=1), source="c")
    )
    assert report.failures == [
        "demo: m.layers.0.mlp.experts.6.up_proj.lora_A.weight: expected owners [1], found [2]"
    ]
    assert report.per_rule == {"routed-expert": [0, 1]}


def test_unknown_rule_id_is_an_error() -> None:
    with pytest.raises(RulesetError) as info:
        run_cases(
            load_ruleset("vllm-ep-lora"),
            parse_cases(CASE.format(rule="routed", owner=2), source="c.toml"),
            source="c.toml",
        )
    assert str(info.value) == (
        "c.toml: key 'm.layers.0.mlp.experts.6.up_proj.lora_A.weight': case 'demo' names rule 'routed', which the "
        "ruleset does not have: expected one of ['<default>', 'fused-expert-lora-a', 'fused-expert-lora-b', "
        "'routed-expert']. Fix: correct the rule id in the case file"
    )


def test_bad_case_file_field() -> None:
    with pytest.raises(RulesetError) as info:
        parse_cases('[[case]]\nname = "x"\n', source="c.toml")
    assert str(info.value) == (
        "c.toml: bad case file field 'case.0.mesh': Field required. Fix: see docs/cases.md for the case file format"
    )


def test_cli_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "vllm-ep-lora"]) == 0
    assert "0 failed" in capsys.readouterr().out
    bad = tmp_path / "bad.cases.toml"
    bad.write_text(CASE.format(rule="routed-expert", owner=0))
    assert main(["test", "vllm-ep-lora", "--cases", str(bad)]) == 1
    assert "FAILED demo: m.layers.0.mlp.experts.6.up_proj.lora_A.weight: expected owners [0], found [2]" in (
        capsys.readouterr().out
    )
    assert main(["test", "vllm-ep-lora", "--cases", str(tmp_path / "none.toml")]) == 2
