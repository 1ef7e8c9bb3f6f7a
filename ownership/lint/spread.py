"""How a checkpoint spreads over the mesh: coordinates that get nothing of a partitioned index
(`empty-coordinate`: an ep rank with no expert, a pp stage with no layer) and an expert count that disagrees with
the checkpoint's keys (`expert-count`).

Both are warnings: the load is still correct, but a rank sits idle, or `num_experts` comes from another model.

Example:
    >>> from ownership import load_ruleset
    >>> from ownership.lint.finding import LintReport
    >>> from ownership.lint.keys import check_keys
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=8", params={"num_experts": 6})
    >>> report = LintReport("vllm-ep-lora", "", "ep=8", 6)
    >>> from ownership.loading.entries import KeyEntry
    >>> check_keys(bound, [KeyEntry(f"m.experts.{e}.w.lora_A.weight") for e in range(6)], report)
    >>> [f.text() for f in report.findings if f.check == "empty-coordinate"]  # doctest: +NORMALIZE_WHITESPACE
    ["warning empty-coordinate: rule 'routed-expert': ep coordinates 6, 7 hold no expert (linear split of 6
    experts over ep=8). Fix: use an ep size of at most 6 (a divisor of it balances best)"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ownership.compile.bind import BoundRule
from ownership.errors import DecisionError
from ownership.lint.finding import LintReport
from ownership.placement.strategy import Shard, Strategy

__all__ = ["Spread"]


@dataclass
class Spread:
    """What the checks need, gathered key by key."""

    rules: dict[str, BoundRule] = field(default_factory=dict)
    """Every rule that decided a key."""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """A shape each rule with placed dims met, to build its dim strategies."""
    highest: dict[str, int] = field(default_factory=dict)
    """The highest captured expert id, per rule."""

    def note(self, rule: BoundRule, ids: Sequence[int], shape: Sequence[int] | None) -> None:
        if rule.companion:
            return  # its placement is its weight's
        if rule.id not in self.rules:
            self.rules[rule.id] = rule
        if rule.dims and shape is not None and rule.id not in self.shapes:
            self.shapes[rule.id] = tuple(shape)
        for placement, g in zip(rule.captures, ids, strict=True):
            if placement.name == "expert" and g > self.highest.get(rule.id, -1):
                self.highest[rule.id] = g

    def report(self, report: LintReport) -> None:
        seen: set[tuple[str, str, int, int]] = set()
        for rule in self.rules.values():
            for name, axis, strategy in self._placements(rule):
                empty = [c for c in range(strategy.num_coords) if not len(strategy.owned(c))]
                if not empty or (name, axis, strategy.num_ids, strategy.num_coords) in seen:
                    continue
                seen.add((name, axis, strategy.num_ids, strategy.num_coords))
                report.add(
                    "empty-coordinate",
                    f"{axis} coordinates {', '.join(map(str, empty))} hold no {name} ({strategy.name} split of "
                    f"{strategy.num_ids} {name}s over {axis}={strategy.num_coords})",
                    rule=rule.id,
                    fix=f"use an {axis} size of at most {strategy.num_ids} (a divisor of it balances best)"
                    if strategy.num_ids < strategy.num_coords
                    else f"give every {axis} coordinate some {name}s (explicit sizes or a table)",
                    data={"axis": axis, "index": name, "coordinates": empty},
                )
        for rule_id, highest in self.highest.items():
            rule = self.rules[rule_id]
            placement = next(p for p in rule.captures if p.name == "expert")
            count = placement.strategy.num_ids
            if highest + 1 < count:
                report.add(
                    "expert-count",
                    f"the checkpoint's expert keys stop at expert {highest}, but {placement.size_text}: experts "
                    f"{highest + 1}..{count - 1} have no keys",
                    rule=rule_id,
                    fix="check num_experts against the checkpoint's config (an adapter's comes from its base model: "
                    "--config), or pass --param num_experts=N",
                    data={"highest": highest, "num_experts": count},
                )
                break

    def _placements(self, rule: BoundRule) -> list[tuple[str, str, Strategy]]:
        out: list[tuple[str, str, Strategy]] = [(p.name, p.axis, p.strategy) for p in rule.captures]
        shape = self.shapes.get(rule.id)
        if shape is not None:
            try:
                strategies = rule.dim_strategies(shape, "")
            except DecisionError:
                strategies = ()
            for dim, (_, _, strategy) in zip(rule.dims, strategies, strict=False):
                if not isinstance(strategy, Shard):
                    out.append((dim.name, dim.axis, strategy))
        return [(name, axis, s) for name, axis, s in out if s.num_coords > 1]
