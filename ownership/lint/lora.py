"""The LoRA checks: each pair's lora_A and lora_B placed alike (`lora-pair`), and a layout's `r` equal to the
adapter's rank (`lora-rank`).

Both collect while the key pass (`ownership.lint.keys`) visits the entries, and report after it.

- `LoraPairs.note` records, per LoRA key, its rule, shape, each owner's selection and the placed dims' ids; a
  pair is sound when both sides are on the same ranks, hold the same ids of every index they share, and keep
  the same r indices (unless vLLM's fully sharded LoRA splits r on one side and gathers it at run time).
- `LoraRanks.check` resolves the layout of a rule that names `r` once per (rule, shape) and compares it with
  `r` and every `rank_pattern` value of the adapter's config.

Example:
    >>> sorted(adapter_ranks({"r": 8, "rank_pattern": {"experts": 16}}))
    [8, 16]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ownership.compile.bind import BoundRule
from ownership.errors import DecisionError
from ownership.lint.finding import LintReport
from ownership.loading.entries import EntryLike
from ownership.placement.selection import Selection, dim_indices, selection_shape

__all__ = ["LoraPairs", "LoraRanks", "PairSide", "adapter_ranks"]

_EXAMPLES = 3


@dataclass
class PairSide:
    """One side of a LoRA pair as the whole mesh holds it."""

    rule: str
    shape: tuple[int, ...] | None
    selections: dict[int, Selection]
    """Each owning rank's selection."""
    ids: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    """Per placed layout dim, the ids each owning rank holds."""


class LoraPairs:
    """lora_A and lora_B of each module, and the `lora-pair` findings they give."""

    def __init__(self) -> None:
        self.sides: dict[str, PairSide] = {}

    def note(
        self, key: str, rule: str, shape: tuple[int, ...] | None, selections: dict[int, Selection]
    ) -> PairSide | None:
        """Record a LoRA key's owners (None for a key that is not one side of a pair)."""
        if "lora_A" not in key and "lora_B" not in key:
            return None
        side = PairSide(rule=rule, shape=None if shape is None else tuple(shape), selections=selections)
        self.sides[key] = side
        return side

    def report(self, report: LintReport) -> None:
        grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key, a in self.sides.items():
            if "lora_A" not in key:
                continue
            head, _, tail = key.rpartition("lora_A")
            b = self.sides.get(f"{head}lora_B{tail}")
            if b is None:
                continue
            problem = _pair_problem(a, b)
            if problem is not None:
                rules = a.rule if a.rule == b.rule else f"{a.rule} / {b.rule}"
                grouped[(rules, problem)] += [key, f"{head}lora_B{tail}"]
        for (rules, problem), keys in grouped.items():
            count = len(keys) // 2
            report.add(
                "lora-pair",
                problem + (f" (in {count} pairs)" if count > 1 else ""),
                rule=rules,
                keys=keys[:2],
                fix="place lora_A and lora_B of a module with the same strategy and split (column: B on out; "
                "row: A on in; the r dim alike on both)",
                data={"count": count},
            )


def _pair_problem(a: PairSide, b: PairSide) -> str | None:
    if a.selections.keys() != b.selections.keys():
        only_a = sorted(set(a.selections) - set(b.selections))
        only_b = sorted(set(b.selections) - set(a.selections))
        return f"lora_A and lora_B are on different ranks (lora_A only on {only_a}, lora_B only on {only_b})"
    for name in set(a.ids) & set(b.ids):
        for rank, ids in a.ids[name].items():
            if b.ids[name].get(rank) != ids:
                return (
                    f"rank {rank} holds {name} {ids} of lora_A but {name} {b.ids[name].get(rank)} of lora_B"
                )
    whole = all(sel is None for sel in a.selections.values()) and all(
        sel is None for sel in b.selections.values()
    )
    if not whole and a.shape is not None and b.shape is not None and len(a.shape) == 2 and len(b.shape) == 2:
        for rank in a.selections:
            r_a = selection_shape(a.selections[rank], a.shape)[0]
            r_b = selection_shape(b.selections[rank], b.shape)[1]
            # A pair that shares no index with its other factor (no expert folded into r) may split r on one
            # side only: vLLM's fully sharded LoRA gathers it at run time.
            gathered = not (set(a.ids) & set(b.ids)) and (r_a == a.shape[0] or r_b == b.shape[1])
            if r_a != r_b and not gathered:
                return f"on rank {rank} lora_A keeps {r_a} of its r rows but lora_B {r_b} of its r columns"
            sel_a, sel_b = a.selections[rank], b.selections[rank]
            rows_a = list(dim_indices(None if sel_a is None else sel_a[0], a.shape[0]))
            cols_b = list(dim_indices(None if sel_b is None else sel_b[1], b.shape[1]))
            if not (set(a.ids) & set(b.ids)) and rows_a != cols_b and not gathered:
                return (
                    f"on rank {rank} lora_A keeps r rows {rows_a[:4]}... but lora_B r columns {cols_b[:4]}..."
                )
    return None


def adapter_ranks(config: Mapping[str, Any] | None) -> frozenset[int]:
    """The LoRA ranks an adapter's config allows: `r` and every `rank_pattern` value (empty: not an adapter)."""
    if not config or type(config.get("r")) is not int:
        return frozenset()
    pattern = config.get("rank_pattern")
    extra = [v for v in pattern.values() if type(v) is int] if isinstance(pattern, Mapping) else []
    return frozenset([config["r"], *extra])


class LoraRanks:
    """The `r` each rule's layout resolves to, against the adapter's ranks (`lora-rank`)."""

    def __init__(self, config: Mapping[str, Any] | None) -> None:
        self.ranks = adapter_ranks(config)
        self._seen: set[tuple[str, tuple[int, ...]]] = set()
        self._bad: dict[tuple[str, int], list[str]] = defaultdict(list)

    def check(self, rule: BoundRule, entry: EntryLike) -> None:
        """Resolve the rule's layout for the entry's shape (once per rule and shape) and compare its `r`."""
        layout = rule.rule.layout
        if not self.ranks or entry.shape is None or layout is None or "r" not in layout.names:
            return
        shape = tuple(entry.shape)
        cache_key = (rule.id, shape)
        if cache_key in self._seen:
            return
        self._seen.add(cache_key)
        try:
            layout, sizes = rule.resolve(shape, entry.key)
        except DecisionError:
            return  # a layout that does not fit is reported by its own check
        d, f = layout.where("r")
        if sizes[d][f] not in self.ranks:
            self._bad[(rule.id, sizes[d][f])].append(entry.key)

    def report(self, report: LintReport) -> None:
        allowed = sorted(self.ranks)
        for (rule, found), keys in self._bad.items():
            report.add(
                "lora-rank",
                f"the layout gives r = {found}, but the adapter's ranks are {allowed} (r and rank_pattern)",
                rule=rule,
                keys=keys[:_EXAMPLES],
                fix="check the param behind the factor folded with r (e.g. num_experts) against the model, or "
                "the layout against the tensor",
                data={"r": found, "ranks": allowed},
            )
