"""Every finding shown in docs/linting.md is a message the linter really produces (pinned in test_lint.py)."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tests.lint.test_lint import CASES


def test_documented_findings_are_real() -> None:
    text = (ROOT / "docs" / "linting.md").read_text()
    blocks = re.findall(r"```text\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == len(CASES)
    assert set(blocks) == {expected for *_, expected in CASES}
