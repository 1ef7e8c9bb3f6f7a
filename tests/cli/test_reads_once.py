"""Each command reads its inputs once: `auto` opens the checkpoint a single time (its config picks the ruleset,
its headers give the entries) and every rule is analysed once, for plan, lint and load alike."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ownership.formats.detect as detect
import ownership.spec.program as program
from ownership import load_ruleset
from ownership.cli import main
from tests.conftest import FIXTURES

CHECKPOINT = FIXTURES / "qwen3_moe" / "base"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Path], Counter[str]]:
    opened: list[Path] = []
    analysed: Counter[str] = Counter()
    open_file, analyze_rule = detect._open_file, program._analyze_rule

    def counting_open(path: Path, **options: Any) -> Any:
        opened.append(path)
        return open_file(path, **options)

    def counting_analysis(index: int, rule: Any, *args: Any, **options: Any) -> Any:
        analysed[rule.id] += 1
        return analyze_rule(index, rule, *args, **options)

    monkeypatch.setattr(detect, "_open_file", counting_open)
    monkeypatch.setattr(program, "_analyze_rule", counting_analysis)
    return opened, analysed


@pytest.mark.parametrize(
    "command",
    [
        ["plan", str(CHECKPOINT), "--mesh", "ep=2", "--all-ranks"],
        ["plan", "auto", str(CHECKPOINT), "--mesh", "ep=2", "--rank", "1", "--format", "json"],
        ["lint", "auto", str(CHECKPOINT), "--mesh", "ep=2"],
        ["lint", "transformers-moe", str(CHECKPOINT), "--mesh", "ep=2,tp=2", "--format", "sarif"],
        ["load", str(CHECKPOINT), "--mesh", "ep=2", "--rank", "0", "--out", "{out}"],
    ],
    ids=["plan-auto", "plan-auto-json", "lint-auto", "lint-named", "load-auto"],
)
def test_one_open_and_one_analysis_per_rule(
    command: list[str],
    counted: tuple[list[Path], Counter[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened, analysed = counted
    argv = [arg.replace("{out}", str(tmp_path / "rank0.safetensors")) for arg in command]
    assert main(argv) == 0, capsys.readouterr().err
    rules = [rule.id for rule in load_ruleset("qwen3_moe").spec.rules]
    assert len(opened) == 1
    # load_ruleset above analysed every rule once more.
    assert analysed == Counter({rule: 2 for rule in rules})


def test_lint_by_name_analyses_each_rule_once(counted: tuple[list[Path], Counter[str]]) -> None:
    from ownership.lint import lint

    opened, analysed = counted
    report = lint("transformers-moe", CHECKPOINT, mesh="ep=2")
    assert report.exit_code == 0
    assert len(opened) == 1
    assert set(analysed.values()) == {1}
    assert sorted(analysed) == sorted(rule.id for rule in load_ruleset("transformers-moe").spec.rules)
