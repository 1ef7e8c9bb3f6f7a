"""Lint reports as text for people, JSON for machines, and SARIF 2.1.0 for CI systems that show findings inline.

Example:
    >>> from ownership.lint.finding import LintReport
    >>> report = LintReport("demo", "demo.toml", "ep=2", 3)
    >>> report.add("dead-rule", "pattern 'x' matches no key of the checkpoint", rule="r")
    >>> to_sarif(report, rule_lines={"r": 7})["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]
    {'startLine': 7}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ownership.lint.finding import CHECKS, LintReport

__all__ = ["rule_lines", "to_json", "to_sarif", "to_text"]

_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def to_text(report: LintReport) -> str:
    """Findings one a line, errors first, then a summary line."""
    order = {"error": 0, "warning": 1, "info": 2}
    lines = [f.text() for f in sorted(report.findings, key=lambda f: order[f.level])]
    keys = f", {report.num_keys} keys" if report.num_keys is not None else ""
    counts = {level: sum(f.level == level for f in report.findings) for level in order}
    verdict = "clean" if not counts["error"] else "FAILED"
    lines.append(
        f"{report.ruleset} ({report.source}), mesh {report.mesh or '-'}{keys}: {verdict}: "
        f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes"
    )
    return "\n".join(lines)


def to_json(report: LintReport) -> dict[str, Any]:
    return {
        "ruleset": report.ruleset,
        "source": report.source,
        "mesh": report.mesh,
        "num_keys": report.num_keys,
        "clean": report.exit_code == 0,
        "findings": [f.to_json() for f in report.findings],
    }


def rule_lines(path: str) -> dict[str, int]:
    """Line of each `id = "..."` in a rule file, for pointing findings at their rule."""
    lines: dict[str, int] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return lines
    for number, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"\s*id\s*=\s*[\"']([^\"']+)[\"']", line)
        if m:
            lines.setdefault(m.group(1), number)
    return lines


def _uri(report: LintReport) -> str:
    """Where SARIF points: the rule file relative to the working folder where it lies below it (as CI systems
    resolve paths against the checkout), else as a file URI; a ruleset given as text keeps its label."""
    if report.rule_file is None:
        return report.source
    path = Path(report.rule_file).resolve()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_uri()


def to_sarif(report: LintReport, *, rule_lines: dict[str, int] | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log with one run; each finding points at its rule's line in the rule file."""
    lines = rule_lines or {}
    used = sorted({f.check for f in report.findings})
    results = []
    for finding in report.findings:
        location: dict[str, Any] = {"artifactLocation": {"uri": _uri(report)}}
        line = lines.get(finding.rule or "")
        if line is not None:
            location["region"] = {"startLine": line}
        results.append(
            {
                "ruleId": finding.check,
                "level": _SARIF_LEVEL[finding.level],
                "message": {"text": finding.text()},
                "locations": [{"physicalLocation": location}],
                "properties": {"rule": finding.rule, "keys": list(finding.keys)},
            }
        )
    return {
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "ownership",
                        "rules": [
                            {
                                "id": check,
                                "shortDescription": {"text": CHECKS.get(check, ("error", check))[1]},
                                "defaultConfiguration": {
                                    "level": _SARIF_LEVEL[CHECKS.get(check, ("error", ""))[0]]
                                },
                            }
                            for check in used
                        ],
                    }
                },
                "results": results,
            }
        ],
    }
