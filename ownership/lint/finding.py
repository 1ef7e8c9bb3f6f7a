"""Lint findings: one problem, its check, its level, the rule and keys it concerns, and the fix.

Example:
    >>> f = Finding("dead-rule", "error", "rule matches no key", rule="routed-expert", fix="fix its pattern")
    >>> f.text()
    "error dead-rule: rule 'routed-expert': rule matches no key. Fix: fix its pattern"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CHECKS", "Finding", "Level", "LintReport"]

Level = Literal["error", "warning", "info"]

# Every check: its level and what it finds. Static checks come from the rule compiler's own codes.
CHECKS: dict[str, tuple[Level, str]] = {
    "schema": ("error", "the rule file is not valid TOML or does not fit the schema"),
    "duplicate-rule-id": ("error", "two rules share one id"),
    "pattern-error": ("error", "a pattern does not compile"),
    "layout-error": ("error", "a layout does not parse"),
    "unknown-axis": ("error", "a rule places or pins on an axis the ruleset does not declare"),
    "unknown-param": ("error", "a rule refers to an undeclared param"),
    "unknown-strategy": ("error", "a strategy that is neither built in nor a declared param"),
    "bad-strategy": ("error", "a strategy used where it cannot apply"),
    "missing-size": ("error", "a placed capture has no size"),
    "placed-not-captured": ("error", "a placed index is neither captured nor in the layout"),
    "placed-text-capture": ("error", "a placed capture is text, not an integer"),
    "axis-placed-twice": ("error", "two placements, or a placement and a pin, on one axis"),
    "unknown-index": ("error", "`sizes` names an index the layout does not have"),
    "bad-rename": ("error", "a rename refers to a capture that does not exist or is not placed"),
    "bad-pin": ("error", "a pin outside the mesh"),
    "bad-table": ("error", "a table or stage sizes that do not fit the mesh"),
    "missing-param": ("error", "a param without a value"),
    "bad-param": ("error", "a param value that is not allowed"),
    "unused-capture": ("warning", "a capture that is neither placed nor used by a rename"),
    "never-matches": ("warning", "a pattern whose example keys are all taken by earlier rules"),
    "backtracking-risk": ("error", "a raw regex that could take more than linear time on a hostile key"),
    "limit": ("error", "an input past one of the limits of ownership.limits (docs/limits.md)"),
    "dead-rule": ("error", "a rule that matches no key of the checkpoint"),
    "variant-absent": ("info", "a layout variant that this checkpoint does not use"),
    "shadowed-rule": ("error", "a rule whose every key is taken by earlier rules"),
    "unmatched-key": ("error", 'keys that no rule matches under default = "error"'),
    "index-out-of-range": ("error", "a captured index outside its size"),
    "layout-mismatch": ("error", "a tensor's shape does not fit the rule's layout"),
    "layout-ambiguous": (
        "error",
        "a tensor that fits several of a rule's orientations, which cut it differently (the model's sizes are "
        "needed to tell them apart)",
    ),
    "shape-needed": ("error", "a rule that cuts a tensor met a key with no shape"),
    "bad-capture": ("error", "a placed capture that matched no digits"),
    "shard-does-not-divide": ("error", "a shard of a dim or factor that does not divide over its axis"),
    "integrity": ("error", "elements owned by no rank, or by several where nothing declares replication"),
    "local-name-collision": ("error", "two keys get one local name on a rank"),
    "lora-pair": ("error", "a LoRA pair's lora_A and lora_B placed inconsistently"),
    "lora-rank": (
        "error",
        "a layout's `r` resolves to a size that is not the adapter's rank (adapter_config.json `r` or a "
        "`rank_pattern` value): the expert count folded with it, or the layout, is wrong",
    ),
    "byte-balance": ("info", "bytes owned per rank: max against mean"),
    "byte-imbalance": ("warning", "the largest rank holds more than 1.25x the mean (its ideal share)"),
    "silent-replication": (
        "error",
        "a tensor that carries an axis's index (an expert's weights under ep, the split dim of its siblings "
        "under tp) kept whole on every coordinate of that axis",
    ),
    "mesh-axis": ("error", "a mesh axis that the ruleset neither places nor replicates along"),
    "wrong-ruleset": ("warning", "a built-in ruleset named for a model_type another built-in serves"),
    "quant-misaligned": (
        "error",
        "a cut of a quantized weight that splits a block, group or pack (the axis sizes that do not are listed)",
    ),
    "quant-companion-shape": ("error", "a quantization companion whose shape is not its family's formula"),
    "quant-orphan": ("error", "a companion with no weight, or a quantized weight missing a companion"),
    "quant-companion-rule": ("error", "a companion decided by another rule than its weight"),
    "empty-coordinate": ("warning", "an ep rank with no expert, or a pp stage with no layer"),
    "expert-count": ("warning", "num_experts disagrees with the experts the checkpoint has"),
}


@dataclass(frozen=True)
class Finding:
    """One problem found by one check."""

    check: str
    level: Level
    message: str
    rule: str | None = None
    keys: tuple[str, ...] = ()
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    def text(self) -> str:
        """One line: level, check id, rule, keys, message and fix."""
        where = []
        if self.rule is not None:
            where.append(f"rule {self.rule!r}")
        if self.keys:
            shown = ", ".join(repr(k) for k in self.keys[:3])
            total = max(len(self.keys), int(self.data.get("num_keys", 0)))
            more = f" (+{total - 3} more)" if total > 3 else ""
            where.append(f"key {shown}{more}" if len(self.keys) == 1 else f"keys {shown}{more}")
        text = f"{self.level} {self.check}: " + ": ".join([*where, self.message])
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "level": self.level,
            "message": self.message,
            "rule": self.rule,
            "keys": list(self.keys),
            "fix": self.fix,
            **({"data": self.data} if self.data else {}),
        }


@dataclass
class LintReport:
    """Every finding of one lint run, with what was linted."""

    ruleset: str
    source: str
    mesh: str | None
    num_keys: int | None
    findings: list[Finding] = field(default_factory=list)
    rule_file: str | None = None
    """The rule file's path, where the ruleset came from one (SARIF points findings at its lines)."""

    def add(self, check: str, message: str, **fields: Any) -> None:
        level: Level = fields.pop("level", None) or CHECKS[check][0]
        keys = fields.pop("keys", ())
        self.findings.append(Finding(check, level, message, keys=tuple(keys), **fields))

    @property
    def num_errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 when no finding is an error, 1 otherwise."""
        return 1 if self.num_errors else 0
