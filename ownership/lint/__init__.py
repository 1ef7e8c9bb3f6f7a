"""The linter: prove a ruleset against a checkpoint and a mesh before anything runs.

Example:
    >>> from ownership.lint import lint
    >>> lint("vllm-ep-lora", mesh="ep=8", params={"num_experts": 64}).exit_code
    0
"""

from __future__ import annotations

from ownership.lint.finding import CHECKS, Finding, LintReport
from ownership.lint.output import to_json, to_sarif, to_text
from ownership.lint.run import lint

__all__ = ["CHECKS", "Finding", "LintReport", "lint", "to_json", "to_sarif", "to_text"]
