"""`ownership test`: a ruleset's case file run from the command line, its exit status and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ownership.cli import commands as cli
from ownership.cli.commands import main
from ownership.spec.builtin import builtin_dir
from tests.lint.test_cases import CASE, KEY


def _test(ruleset: str = "vllm-ep-lora", cases: Path | None = None, fmt: str = "text") -> int:
    """`ownership test RULESET [--cases FILE] --format FMT`, as the command line runs it."""
    return main(["test", ruleset, *(["--cases", str(cases)] if cases else []), "--format", fmt])


def test_main_test_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _test() == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["rule", "passed", "failed"]
    assert "vllm-ep-lora: " in out and ", 0 failed (" in out

    failing = tmp_path / "failing.cases.toml"
    failing.write_text(CASE.format(rule="routed-expert", owners="[0]"))
    assert _test(cases=failing) == 1
    out = capsys.readouterr().out
    assert f"FAILED uneven linear: {KEY}\n  owners: expected [0]\n          found    [2]\n" in out
    assert "rules without a check: fused-expert-lora-a, fused-expert-lora-b\n" in out
    assert f"vllm-ep-lora: 0 passed, 1 failed ({failing})" in out

    assert _test(cases=failing, fmt="json") == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["passed"], result["failed"], result["per_rule"]["routed-expert"]) == (
        0,
        1,
        {"passed": 0, "failed": 1},
    )

    malformed = tmp_path / "malformed.cases.toml"
    malformed.write_text(CASE.format(rule="routed", owners="[2]"))
    for args, message in [
        (
            {"cases": tmp_path / "none.cases.toml"},
            "none.cases.toml: no case file for ruleset 'vllm-ep-lora'",
        ),
        ({"ruleset": str(tmp_path / "x.toml")}, "x.toml: cannot read rule file"),
        ({"ruleset": "no-such-ruleset"}, "no built-in ruleset 'no-such-ruleset'"),
        ({"cases": malformed}, "rule 'routed' is not a rule of 'vllm-ep-lora'"),
    ]:
        assert _test(**args) == 2
        assert message in capsys.readouterr().err


def test_rule_file_without_case_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rule_file = tmp_path / "moe.toml"
    rule_file.write_text((builtin_dir() / "vllm-ep-lora.toml").read_text())
    assert _test(ruleset=str(rule_file)) == 2
    expected = f"error: {tmp_path / 'moe.cases.toml'}: no case file for ruleset 'vllm-ep-lora'"
    assert expected in capsys.readouterr().err


def test_test_command_arguments() -> None:
    parser = cli._parser()
    args = parser.parse_args(["test", "vllm-ep-lora", "--cases", "c.toml", "--format", "json"])
    assert (args.handler, args.ruleset, args.cases, args.format) == (
        cli._test,
        "vllm-ep-lora",
        Path("c.toml"),
        "json",
    )
    assert parser.parse_args(["test", "x"]).format == "text"
