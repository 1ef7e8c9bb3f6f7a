"""No silent replication (`silent-replication`): a tensor that carries an axis's index, kept whole on every
coordinate of that axis by a rule that does not split it (a catch-all, say), is an error naming the key and rule.

A tensor carries the expert index when its key has an `experts` segment, when it has three or more dims and the
first is the expert count, or when its first dim is the expert count and other tensors under its module are
partitioned over experts (GPT-OSS's `mlp.mlp1_bias` beside `mlp.mlp1_weight.blocks`; a router's weight, whose
module holds nothing partitioned, does not). It carries a split dim of another axis (tp) when a sibling (a tensor
of the same module: `q_proj.bias` beside `q_proj.weight`) is cut over that axis on its first dim and the two first
dims have one size; a row-parallel weight, cut on its second dim, leaves its bias whole, as it should be. A rule
that means to keep its tensors whole along an axis says so (`replicate = ["ep"]`), and is left be.

Example:
    >>> from ownership import load_ruleset
    >>> from ownership.lint.finding import LintReport
    >>> from ownership.lint.keys import check_keys
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=2", params={"num_experts": 4})
    >>> report = LintReport("vllm-ep-lora", "", "ep=2", 1)
    >>> from ownership.loading.entries import KeyEntry
    >>> check_keys(bound, [KeyEntry("m.experts.gate_up_proj", "F32", (4, 8, 2))], report)
    >>> [f.keys for f in report.findings if f.check == "silent-replication"]
    [('m.experts.gate_up_proj',)]
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ownership.compile.bind import BoundRule, BoundRuleset
from ownership.errors import DecisionError
from ownership.lint.finding import LintReport
from ownership.placement.decision import DEFAULT_RULE

__all__ = ["Replication"]

_EXAMPLES = 3


@dataclass
class Replication:
    """Collects, key by key, what the check needs; `report` decides once every key is seen."""

    bound: BoundRuleset
    expert_axis: str | None = None
    num_experts: int | None = None
    carriers: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    """(axis, rule) -> keys kept whole along the axis that carry its index."""
    expert_candidates: list[tuple[str, str]] = field(default_factory=list)
    """(key, rule) of whole tensors whose first dim is the expert count: carriers if their module holds keys
    partitioned over experts."""
    partitioned: list[str] = field(default_factory=list)
    """Keys partitioned over the expert axis."""
    cut_first: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)
    """(axis, module) -> size of the first dim -> a key cut on it over the axis."""
    whole_first: list[tuple[str, str, str, int, str]] = field(default_factory=list)
    """(axis, module, key, first dim, rule) of tensors whole along an axis their siblings may cut."""

    def __post_init__(self) -> None:
        mesh = self.bound.mesh
        for rule in self.bound.rules:
            for capture in rule.captures:
                if capture.name == "expert" and mesh.size(capture.axis) > 1:
                    self.expert_axis, self.num_experts = capture.axis, capture.strategy.num_ids
            for dim in rule.dims:
                if dim.name == "expert" and mesh.size(dim.axis) > 1:
                    self.expert_axis = dim.axis
                    self.num_experts = self.num_experts or rule.known_sizes.get("expert")
        self._axes = [axis for axis, size in mesh.axes if size > 1]
        self._expert_parts = frozenset(mesh.components(self.expert_axis)) if self.expert_axis else frozenset()
        self._splits: dict[str, frozenset[str]] = {}

    def splits(self, rule: BoundRule | None) -> frozenset[str]:
        """The axes a rule splits or pins a tensor over, or says it replicates along (none for the default)."""
        if rule is None:
            return frozenset()
        found = self._splits.get(rule.id)
        if found is None:
            mesh = rule.mesh
            found = frozenset(
                part
                for axis in [
                    *(c.axis for c in rule.captures),
                    *(d.axis for d in rule.dims if mesh.size(d.axis) > 1),
                    *rule.pins,
                    *rule.rule.spec.replicate,
                ]
                for part in (mesh.components(axis) or (axis,))
            )
            self._splits[rule.id] = found
        return found

    def note(self, key: str, shape: Sequence[int] | None, rule: BoundRule | None) -> None:
        """One decided key (`rule` None: the ruleset's default replicated it)."""
        splits = self.splits(rule)
        rule_id = DEFAULT_RULE if rule is None else rule.id
        module = key.rpartition(".")[0]
        expert_axis = self.expert_axis
        if expert_axis is not None:
            if self._expert_parts <= splits:
                self.partitioned.append(key)
            elif "experts" in key.split("."):
                self.carriers[(expert_axis, rule_id)].append(key)
            elif shape and shape[0] == self.num_experts:
                if len(shape) >= 3:
                    self.carriers[(expert_axis, rule_id)].append(key)
                else:
                    self.expert_candidates.append((key, rule_id))
        if not shape:
            return
        for axis in self._axes:
            if axis == expert_axis:
                continue
            if axis not in splits:
                self.whole_first.append((axis, module, key, shape[0], rule_id))
            elif rule is not None and _cuts_first_dim(rule, axis, tuple(shape), key):
                self.cut_first.setdefault((axis, module), {})[shape[0]] = key

    def report(self, report: LintReport) -> None:
        partitioned = sorted(self.partitioned)
        for key, rule_id in self.expert_candidates:
            module = key.rpartition(".")[0] + "."
            at = bisect_left(partitioned, module)
            if at < len(partitioned) and partitioned[at].startswith(module) and self.expert_axis is not None:
                self.carriers[(self.expert_axis, rule_id)].append(key)
        siblings: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for axis, module, key, first, rule_id in self.whole_first:
            cut = self.cut_first.get((axis, module))
            if cut is not None and first in cut:
                siblings[(axis, rule_id)].append((key, cut[first]))
        for (axis, rule_id), keys in self.carriers.items():
            report.add(
                "silent-replication",
                f"{_tensors(len(keys))} kept whole on every {axis} rank, though "
                + ("it carries" if len(keys) == 1 else "they carry")
                + " the expert index (each rank would load every expert's weights)",
                rule=rule_id,
                keys=keys[:_EXAMPLES],
                fix=f"add a rule{_before(rule_id)} that places them over {axis}: <expert> in the pattern for "
                "per-expert keys, or a layout naming `expert` for fused tensors; or replicate = "
                f'["{axis}"] on a rule that means to keep them whole',
                data={"axis": axis, "num_keys": len(keys)},
            )
        for (axis, rule_id), pairs in siblings.items():
            key, sibling = pairs[0]
            report.add(
                "silent-replication",
                f"{_tensors(len(pairs))} kept whole on every {axis} rank while a sibling is cut over {axis} on "
                f"the same first dim (e.g. {sibling!r})",
                rule=rule_id,
                keys=[k for k, _ in pairs[:_EXAMPLES]],
                fix=f"give them a rule{_before(rule_id)} whose layout cuts that dim over {axis}, as the sibling's "
                f'rule does; or replicate = ["{axis}"] on a rule that means to keep them whole',
                data={"axis": axis, "num_keys": len(pairs), "siblings": [s for _, s in pairs[:_EXAMPLES]]},
            )


def _tensors(count: int) -> str:
    return "1 tensor" if count == 1 else f"{count} tensors"


def _before(rule_id: str) -> str:
    return "" if rule_id == DEFAULT_RULE else f" before {rule_id!r}"


def _cuts_first_dim(rule: BoundRule, axis: str, shape: tuple[int, ...], key: str) -> bool:
    """Whether the rule cuts this tensor's dim 0 over `axis` (a shape it does not fit is reported elsewhere)."""
    if rule.companion or not any(dim.axis == axis for dim in rule.dims):
        return False
    try:
        strategies = rule.dim_strategies(shape, key)
    except DecisionError:  # a shape the layout does not fit has its own finding
        return False
    return any(dim.axis == axis and d == 0 for dim, (d, _, _) in zip(rule.dims, strategies, strict=True))
