"""One rank's decider: `RankRules.decide(key, shape)` is one pattern match and a few table look-ups.

The matching branch of the joined pattern names the rule (by its group's number); each placed capture's owned
slot is read from a per-rank table; a simple rule (one placed capture, no layout, no rename) answers from a dict
of its digits. Selections come from the bound rule, computed once per (shape, coordinates).

Example:
    >>> from ownership import load_ruleset
    >>> rules = load_ruleset("vllm-ep-lora").bind(mesh="ep=4", params={"num_experts": 10}).for_rank(2)
    >>> decision = rules.decide("m.layers.0.mlp.experts.7.w1.lora_A.weight")
    >>> decision.owned, decision.rule, dict(decision.captures)
    (True, 'routed-expert', {'expert': 7})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ownership.placement.decision import DEFAULT_RULE, NO_CAPTURES, Decision
from ownership.placement.selection import is_empty

if TYPE_CHECKING:
    from ownership.compile.bind import BoundRule, BoundRuleset

__all__ = ["RankRules"]


class RankRules:
    """Decisions for one rank: `decide(key, shape)` is one pattern match plus table look-ups."""

    def __init__(self, bound: BoundRuleset, rank: int) -> None:
        self.bound = bound
        self.rank = rank
        self.coords = bound.mesh.coords(rank)
        self.mesh = bound.mesh
        program = bound.program
        self._match = program.match
        self._default = bound.default
        self._rules: dict[str, _RankRule] = {
            group: _RankRule(bound.by_index[rule.index], self.coords, program.group_numbers)
            for group, rule in program.by_group.items()
        }

        self.decide: Callable[..., Decision] = self._make_decide()
        """`decide(key, shape=None)`: the decision for `key`; `shape` is needed by rules that select part of a
        tensor. A closure over this rank's tables: the per-key path reads locals, not attributes."""

    def _make_decide(self) -> Callable[..., Decision]:
        match = self._match
        rules = self._rules
        # Keyed by the number of the rule's outer group (`m.lastindex`), cheaper than its name.
        numbers = self.bound.program.group_numbers
        by_number = {numbers.get(group, -1): rule for group, rule in rules.items()}
        # For simple rules: digits text -> captures or {}, the capture's group number, the rule id.
        fast = {
            numbers.get(group, -1): (r.fast, r.fast_group, r.id)
            for group, r in rules.items()
            if r.fast is not None
        }
        general = self._decide
        unmatched = self._unmatched
        new, decision, nothing = _new, Decision, NO_CAPTURES

        def decide(key: str, shape: Sequence[int] | None = None) -> Decision:
            m = match(key)
            if m is None:
                return unmatched(key)
            number = m.lastindex
            entry = fast.get(number)
            if entry is not None:
                captures = entry[0].get(m[entry[1]])
                if captures:
                    return new(decision, (key, True, entry[2], key, captures, None))
                if captures is not None:
                    return new(decision, (key, False, entry[2], None, nothing, None))
            rule = by_number.get(number)
            return general(key, m, rule if rule is not None else rules[m.lastgroup], shape)

        return decide

    def _unmatched(self, key: str) -> Decision:
        if self._default == "error":
            self.bound.unmatched(key)
        owned = self._default == "replicate"
        return _new(Decision, (key, owned, DEFAULT_RULE, key if owned else None, NO_CAPTURES, None))

    def _decide(self, key: str, m: Any, rule: _RankRule, shape: Sequence[int] | None) -> Decision:
        if rule.never:
            return rule.not_owned(key)
        slots: dict[str, int] = {}
        for name, group, table, placement in rule.checks:
            try:
                g = int(m.group(group))
            except (TypeError, ValueError):
                raise rule.bound.bad_capture(placement, m.group(group), key) from None
            if g >= len(table):
                rule.bound.global_id(placement, g, key)
                return rule.not_owned(key)
            slot = table[g]
            if slot < 0:
                return rule.not_owned(key)
            slots[name] = slot
        captures = rule.bound.rule.captures(m)
        if rule.simple:
            return _new(Decision, (key, True, rule.id, key, captures, None))
        bound = rule.bound
        selection = bound.selection(None if shape is None else tuple(shape), rule.dim_coords, key)
        if is_empty(selection):
            return rule.not_owned(key)
        return _new(
            Decision, (key, True, rule.id, bound.local_key(key, captures, slots), captures, selection)
        )


# Decision is a NamedTuple: building it from a tuple skips argument parsing on the per-key path.
_new = tuple.__new__


class _RankRule:
    """A bound rule seen from one rank: slot tables per capture, pin and dim coordinates precomputed."""

    __slots__ = ("bound", "checks", "dim_coords", "fast", "fast_group", "id", "never", "simple")

    def __init__(self, bound: BoundRule, coords: Mapping[str, int], bound_groups: Mapping[str, int]) -> None:
        self.bound = bound
        self.id = bound.id
        mesh = bound.mesh
        self.never = bound.drop or any(
            mesh.coord(coords, axis) not in pinned for axis, pinned in bound.pins.items()
        )
        self.checks = tuple(
            (p.name, p.group, p.strategy.slot_table(mesh.coord(coords, p.axis)), p) for p in bound.captures
        )
        self.dim_coords = tuple(mesh.coord(coords, d.axis) for d in bound.dims)
        self.simple = bound.rule.rename is None and bound.rule.layout is None
        # For a simple rule with one placed int capture: digits text -> captures when owned, {} when not.
        # Texts outside the table (leading zeros, out of range) take the general path.
        self.fast: dict[str, Mapping[str, int | str]] | None = None
        self.fast_group: int | str = ""
        if self.simple and not self.never and len(self.checks) == 1 and len(bound.rule.groups) == 1:
            name, group, table, _ = self.checks[0]
            # A group's number is a cheaper look-up than its name.
            self.fast_group = bound_groups.get(group, group)
            self.fast = {str(g): ({name: g} if slot >= 0 else {}) for g, slot in enumerate(table)}

    def not_owned(self, key: str) -> Decision:
        return _new(Decision, (key, False, self.id, None, NO_CAPTURES, None))
