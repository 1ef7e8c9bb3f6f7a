"""The rule compiler: a ruleset bound to params and a mesh decides keys for one rank or for the whole mesh.

`bind(program, mesh=..., params=...)` resolves every size and strategy once. `BoundRuleset.for_rank(rank)` gives
a `RankRules` whose `decide(key, shape)` is one regex match and a few list look-ups: the matching branch of the
joined pattern names the rule, each placed capture's owned slot is read from a per-rank table, and the
selection for a tensor shape is computed once per (rule, shape) and cached. `BoundRuleset.owners(key, shape)`
answers for every rank at once from the strategies' inverses, never by deciding rank after rank.

Example:
    >>> from ownership.spec import parse_ruleset
    >>> from ownership.rules import analyze
    >>> from ownership.mesh import Mesh
    >>> spec = parse_ruleset('''
    ... name = "demo"
    ... axes = ["ep"]
    ... default = "replicate"
    ... [params.num_experts]
    ... [[rule]]
    ... id = "routed-expert"
    ... match = "**.experts.<expert>.**"
    ... place = { expert = { over = "ep", size = "num_experts" } }
    ... rename = "experts.{expert.local}"
    ... ''')
    >>> bound = bind(analyze(spec), mesh=Mesh.parse("ep=4"), params={"num_experts": 10})
    >>> bound.for_rank(2).decide("layers.0.experts.7.w").local_key
    'experts.1'
    >>> [rank for rank, _ in bound.owners("layers.0.experts.7.w")]
    [2]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ownership.decision import DEFAULT_RULE, NO_CAPTURES, Decision
from ownership.errors import DecisionError, RulesetError
from ownership.mesh import Mesh
from ownership.params import evaluate_size
from ownership.placement import Part, Shard, Strategy, make_strategy
from ownership.rules import AnalyzedRule, Program
from ownership.selection import DimSelection, Run, Selection, normalize_selection, runs_from_indices
from ownership.spec import STRATEGIES, PlacementSpec

__all__ = ["BoundRule", "BoundRuleset", "RankRules", "bind", "rule_applies"]


@dataclass(frozen=True)
class CapturePlacement:
    """A key capture partitioned over an axis; the strategy is fixed once params and mesh are known."""

    name: str
    group: str
    axis: str
    strategy: Strategy
    size_text: str
    out_of_range_owned_by_none: bool


@dataclass(frozen=True)
class DimPlacement:
    """A layout dim or factor placed over an axis; its strategy depends on the tensor's shape."""

    name: str
    axis: str
    spec: PlacementSpec
    strategy_name: str


class BoundRule:
    """One rule with params and mesh resolved."""

    def __init__(self, rule: AnalyzedRule, *, mesh: Mesh, params: Mapping[str, Any], source: str) -> None:
        self.rule = rule
        self.id = rule.id
        self.mesh = mesh
        self.params = params
        self.source = source
        self.drop = rule.spec.drop
        self.captures = tuple(
            self._bind_capture(name, group, placement) for name, (group, placement) in rule.captured.items()
        )
        self.dims = tuple(
            DimPlacement(name, placement.over, placement, self._strategy_name(placement, name))
            for name, placement in rule.dims.items()
        )
        self.pins: dict[str, tuple[int, ...]] = {
            axis: tuple(
                sorted(
                    {self._pin_coord(axis, at) for at in (pinned if isinstance(pinned, list) else [pinned])}
                )
            )
            for axis, pinned in rule.spec.pin.items()
        }
        self.known_sizes = {
            name: evaluate_size(ref, params, rule=self.id, source=source)
            for name, ref in rule.spec.sizes.items()
        }
        for dim in self.dims:
            if dim.spec.size is not None:
                self.known_sizes[dim.name] = evaluate_size(dim.spec.size, params, rule=self.id, source=source)
        self._selection_cache: dict[tuple[tuple[int, ...], tuple[int, ...]], Selection] = {}

    # -- binding -------------------------------------------------------------------------------------------

    def _strategy_name(self, placement: PlacementSpec, index: str) -> str:
        name = placement.strategy
        if name in STRATEGIES:
            return name
        value = self.params.get(name)
        if value not in STRATEGIES:
            raise RulesetError(
                f"param {name!r} names no strategy for index {index!r}",
                source=self.source,
                rule=self.id,
                found=repr(value),
                expected=f"one of {', '.join(STRATEGIES)}",
                fix=f"pass --param {name}=linear (or another strategy)",
                code="unknown-strategy",
            )
        return str(value)

    def _bind_capture(self, name: str, group: str, placement: PlacementSpec) -> CapturePlacement:
        strategy_name = self._strategy_name(placement, name)
        if strategy_name == "shard":
            raise RulesetError(
                f"captured index {name!r} cannot be sharded (strategy {placement.strategy!r} is 'shard')",
                source=self.source,
                rule=self.id,
                expected="a partition strategy (linear, round_robin, table, layers, vllm_contiguous)",
                fix=f"pass another value for --param {placement.strategy}",
                code="bad-strategy",
            )
        num_coords = self.mesh.size(placement.over)
        table = self._table(placement, num_coords) if strategy_name == "table" else None
        if placement.size is not None:
            num_ids = evaluate_size(placement.size, self.params, rule=self.id, source=self.source)
            size_text = f"{placement.size}={num_ids}" if isinstance(placement.size, str) else str(num_ids)
        else:
            num_ids = 1 + max((g for ids in table or () for g in ids), default=-1)
            size_text = f"table of {num_ids}"
        sizes = self._stage_sizes(placement, num_ids, num_coords) if strategy_name == "layers" else None
        if table is not None:
            for coord, ids in enumerate(table):
                bad = [g for g in ids if not 0 <= g < num_ids]
                if bad:
                    raise RulesetError(
                        f"table of index {name!r} lists ids outside 0..{num_ids - 1} on coordinate {coord}",
                        source=self.source,
                        rule=self.id,
                        found=str(bad),
                        fix="fix the table or the size",
                        code="bad-table",
                    )
        strategy = make_strategy(
            strategy_name, num_ids=num_ids, num_coords=num_coords, table=table, sizes=sizes
        )
        return CapturePlacement(
            name=name,
            group=group,
            axis=placement.over,
            strategy=strategy,
            size_text=size_text,
            out_of_range_owned_by_none=strategy_name == "vllm_contiguous",
        )

    def _table(self, placement: PlacementSpec, num_coords: int) -> list[list[int]]:
        table: Any = placement.table
        if isinstance(table, str):
            table = self.params.get(table)
        if (
            not isinstance(table, list)
            or len(table) != num_coords
            or not all(isinstance(ids, list) and all(isinstance(g, int) for g in ids) for ids in table)
            or any(len(set(ids)) != len(ids) for ids in table)
        ):
            raise RulesetError(
                f"table for axis {placement.over!r} does not fit the mesh",
                source=self.source,
                rule=self.id,
                found=_short(table),
                expected=f"a list of {num_coords} lists of ids (one per coordinate of {placement.over!r}), "
                "no id twice in one list",
                fix="give one list of ids per coordinate, e.g. table = [[0, 1], [2, 3]]",
                code="bad-table",
            )
        return table

    def _stage_sizes(self, placement: PlacementSpec, num_ids: int, num_coords: int) -> list[int] | None:
        sizes: Any = placement.sizes
        if isinstance(sizes, str):
            sizes = self.params.get(sizes)
        if sizes is None or sizes == []:
            # An empty list (a param's default) means the split of `layers` itself.
            return None
        if not isinstance(sizes, list) or len(sizes) != num_coords or sum(sizes) != num_ids:
            raise RulesetError(
                f"stage sizes for axis {placement.over!r} do not fit",
                source=self.source,
                rule=self.id,
                found=_short(sizes),
                expected=f"{num_coords} sizes summing to {num_ids}",
                fix="give one size per stage; they must add up to the number of layers",
                code="bad-table",
            )
        return list(sizes)

    def _pin_coord(self, axis: str, at: int | str) -> int:
        size = self.mesh.size(axis)
        coord = 0 if at == "first" else size - 1 if at == "last" else int(at)
        if not 0 <= coord < size:
            raise RulesetError(
                f"pin at {at} on axis {axis!r} is outside the mesh",
                source=self.source,
                rule=self.id,
                expected=f"0..{size - 1}",
                fix="pin to first, last or a coordinate the mesh has",
                code="bad-pin",
            )
        return coord

    # -- deciding ------------------------------------------------------------------------------------------

    def global_id(self, placement: CapturePlacement, value: int, key: str) -> int:
        """Check a captured id against its size: an error, or owned by nobody in vLLM-compatible mode."""
        if 0 <= value < placement.strategy.num_ids or placement.out_of_range_owned_by_none:
            return value
        raise DecisionError(
            f"captured {placement.name} {value} is out of range",
            source=self.source,
            key=key,
            rule=self.id,
            found=str(value),
            expected=f"0..{placement.strategy.num_ids - 1} ({placement.size_text})",
            fix=f"check the param behind the size of {placement.name!r} against the checkpoint",
            code="index-out-of-range",
        )

    def bad_capture(self, placement: CapturePlacement, text: str | None, key: str) -> DecisionError:
        """A placed capture that matched no digits (an optional or empty group of a raw regex)."""
        return DecisionError(
            f"placed capture {placement.name!r} did not capture an integer",
            source=self.source,
            key=key,
            rule=self.id,
            found=repr(text),
            expected="one or more digits",
            fix=f"make the group of {placement.name!r} match digits only and always, e.g. (?P<{placement.name}>[0-9]+)",
            code="bad-capture",
        )

    def local_key(self, key: str, captures: Mapping[str, int | str], slots: Mapping[str, int]) -> str:
        if self.rule.rename is None:
            return key
        out = []
        for piece in self.rule.rename:
            out.append(piece.literal)
            if piece.name is not None:
                out.append(str(slots[piece.name] if piece.local else captures[piece.name]))
        return "".join(out)

    def selection(self, shape: tuple[int, ...] | None, dim_coords: tuple[int, ...], key: str) -> Selection:
        """The selection for a tensor of `shape` on the given coordinates of the dim placements' axes."""
        if not self.dims:
            return None
        if shape is None:
            raise DecisionError(
                "this rule selects part of the tensor and needs its shape",
                source=self.source,
                key=key,
                rule=self.id,
                expected="a shape",
                fix="pass shape= (or --shape 24,32), or plan from a checkpoint whose headers give it",
                code="shape-needed",
            )
        cache_key = (shape, dim_coords)
        cached = self._selection_cache.get(cache_key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        selection = self._compute_selection(shape, dim_coords, key)
        self._selection_cache[cache_key] = selection
        return selection

    def dim_strategies(self, shape: tuple[int, ...], key: str) -> tuple[tuple[int, int, Strategy], ...]:
        """For each dim placement: (dim, factor position, strategy over its factor size)."""
        layout = self.rule.layout
        assert layout is not None
        sizes = layout.resolve(shape, known=self.known_sizes, key=key, rule=self.id, source=self.source)
        out = []
        for dim in self.dims:
            d, f = layout.where(dim.name)
            out.append((d, f, self._dim_strategy(dim, sizes[d][f], key)))
        return tuple(out)

    def _dim_strategy(self, dim: DimPlacement, num_ids: int, key: str) -> Strategy:
        spec = dim.spec
        num_coords = self.mesh.size(dim.axis)
        parts = None
        if dim.strategy_name == "shard" and spec.parts is not None:
            heads: list[int | str | None] = list(spec.heads) if spec.heads else [None] * len(spec.parts)
            parts = [
                Part(
                    evaluate_size(size, self.params, rule=self.id, source=self.source),
                    None if h is None else evaluate_size(h, self.params, rule=self.id, source=self.source),
                )
                for size, h in zip(spec.parts, heads, strict=True)
            ]
            if sum(p.size for p in parts) != num_ids:
                raise DecisionError(
                    f"parts of {dim.name!r} do not add up to its size",
                    source=self.source,
                    key=key,
                    rule=self.id,
                    found=f"parts {[p.size for p in parts]} (sum {sum(p.size for p in parts)})",
                    expected=f"sum {num_ids}",
                    fix="check the params behind `parts` against the checkpoint",
                    code="shard-does-not-divide",
                )
        table = self._table(spec, num_coords) if dim.strategy_name == "table" else None
        sizes = self._stage_sizes(spec, num_ids, num_coords) if dim.strategy_name == "layers" else None
        strategy = make_strategy(
            dim.strategy_name,
            num_ids=num_ids,
            num_coords=num_coords,
            table=table,
            sizes=sizes,
            parts=parts,
            uneven=spec.uneven,
        )
        if isinstance(strategy, Shard):
            problem = strategy.problem()
            if problem is not None:
                raise DecisionError(
                    f"cannot shard {dim.name!r} over {dim.axis}={num_coords}: {problem.found}",
                    source=self.source,
                    key=key,
                    rule=self.id,
                    found=f"{dim.name} of size {num_ids}",
                    expected=problem.expected,
                    fix=f"set uneven = true on place.{dim.name} to allow an uneven split, or change the mesh"
                    if problem.uneven_helps
                    else f"change the size of {dim.axis!r} in the mesh",
                    code="shard-does-not-divide",
                )
        return strategy

    def _compute_selection(self, shape: tuple[int, ...], dim_coords: tuple[int, ...], key: str) -> Selection:
        layout = self.rule.layout
        assert layout is not None
        sizes = layout.resolve(shape, known=self.known_sizes, key=key, rule=self.id, source=self.source)
        owned: dict[tuple[int, int], Sequence[int]] = {}
        for (d, f, strategy), coord in zip(self.dim_strategies(shape, key), dim_coords, strict=True):
            owned[(d, f)] = strategy.owned(coord)
        per_dim: list[DimSelection] = []
        for d, factor_sizes in enumerate(sizes):
            factors = [owned.get((d, f)) for f in range(len(factor_sizes))]
            per_dim.append(None if all(o is None for o in factors) else compose_runs(factor_sizes, factors))
        return normalize_selection(per_dim, shape)


_MISSING = object()


def compose_runs(sizes: Sequence[int], owned: Sequence[Sequence[int] | None]) -> tuple[Run, ...]:
    """Runs over a dim made of factors (outermost first), keeping `owned[i]` of factor i (None: all of it)."""
    return _compose(tuple(sizes), tuple(None if o is None else tuple(o) for o in owned))


@lru_cache(maxsize=4096)
def _compose(sizes: tuple[int, ...], owned: tuple[tuple[int, ...] | None, ...]) -> tuple[Run, ...]:
    flat: list[int] = [0]
    for size, keep in zip(sizes, owned, strict=True):
        values = range(size) if keep is None else keep
        flat = [base * size + v for base in flat for v in values]
    return runs_from_indices(flat)


class BoundRuleset:
    """A ruleset with params and mesh resolved: per-rank deciders and whole-mesh owners."""

    def __init__(self, program: Program, *, mesh: Mesh, params: Mapping[str, Any]) -> None:
        active = tuple(rule for rule in program.rules if rule_applies(rule, params))
        if len(active) != len(program.rules):
            program = program.subset(active)
        self.program = program
        self.mesh = mesh
        self.params = dict(params)
        self.default = program.spec.default
        self.rules = tuple(
            BoundRule(rule, mesh=mesh, params=params, source=program.source) for rule in program.rules
        )
        self.by_group = {f"_r{rule.rule.index}": rule for rule in self.rules}
        self.match = program.match
        self._ranks_cache: dict[
            tuple[str, tuple[int, ...]], list[tuple[int, tuple[int, ...], dict[str, int]]]
        ] = {}
        self.group_numbers: dict[str, int] = dict(getattr(program.match.__self__, "groupindex", {}))

    def for_rank(self, rank: int) -> RankRules:
        return RankRules(self, rank)

    def unmatched(self, key: str) -> None:
        raise DecisionError(
            "no rule matches this key",
            key=key,
            source=self.program.source,
            found="no match",
            expected=f"a match for one of the rules {[r.id for r in self.rules]}",
            fix='add a rule for it, or set default = "replicate" or "drop" in the ruleset',
            code="unmatched-key",
        )

    def owners(self, key: str, shape: Sequence[int] | None = None) -> list[tuple[int, Decision]]:
        """Every rank that owns `key`, with its decision, from the strategies' inverses."""
        m = self.match(key)
        if m is None:
            if self.default == "error":
                self.unmatched(key)
            if self.default == "drop":
                return []
            replicated = Decision(key, owned=True, rule=DEFAULT_RULE, local_key=key)
            return [(rank, replicated) for rank in self.mesh.ranks()]
        bound = self.by_group[m.lastgroup]
        if bound.drop:
            return []
        for placement in bound.captures:
            text = m.group(placement.group)
            if not text or not text.isdigit():
                raise bound.bad_capture(placement, text, key)
        captures = bound.rule.captures(m)
        ids = tuple(bound.global_id(p, int(captures[p.name]), key) for p in bound.captures)
        shape_t = None if shape is None else tuple(shape)
        out: list[tuple[int, Decision]] = []
        for rank, dim_coords, slots in self.owner_ranks(bound, ids):
            selection = bound.selection(shape_t, dim_coords, key)
            if _empty(selection):
                continue
            local = bound.local_key(key, captures, slots)
            out.append((rank, _new(Decision, (key, True, bound.id, local, captures, selection))))
        return out

    def owner_ranks(
        self, bound: BoundRule, ids: tuple[int, ...]
    ) -> list[tuple[int, tuple[int, ...], dict[str, int]]]:
        """(rank, coordinates of the dim placements' axes, local slots) for the placed ids; cached per ids."""
        cache_key = (bound.id, ids)
        cached = self._ranks_cache.get(cache_key)
        if cached is not None:
            return cached
        per_axis: dict[str, list[tuple[int, str | None, int]]] = {}
        for placement, g in zip(bound.captures, ids, strict=True):
            per_axis[placement.axis] = [(c, placement.name, s) for c, s in placement.strategy.owners(g)]
        for axis, pinned in bound.pins.items():
            per_axis[axis] = [(coord, None, 0) for coord in pinned]
        fixed: dict[str, int] = {}
        for axis in set(per_axis) - set(self.mesh.names):
            # An axis the mesh does not declare has one coordinate, 0: the key is owned only if 0 holds it.
            at_zero = [item for item in per_axis[axis] if item[0] == 0]
            if not at_zero:
                self._ranks_cache[cache_key] = []
                return []
            fixed.update({name: slot for _, name, slot in at_zero if name})
        choices = [per_axis.get(axis, [(c, None, 0) for c in range(size)]) for axis, size in self.mesh.axes]
        dim_axes = [self.mesh.names.index(d.axis) if d.axis in self.mesh.names else -1 for d in bound.dims]
        result = []
        for combo in itertools.product(*choices):
            coords = [c for c, _, _ in combo]
            rank = 0
            for (_, size), c in zip(self.mesh.axes, coords, strict=True):
                rank = rank * size + c
            slots = {**fixed, **{name: slot for _, name, slot in combo if name is not None}}
            result.append((rank, tuple(coords[i] if i >= 0 else 0 for i in dim_axes), slots))
        self._ranks_cache[cache_key] = result
        return result


def _empty(selection: Selection) -> bool:
    return selection is not None and any(dim is not None and not dim for dim in selection)


class RankRules:
    """Decisions for one rank: `decide(key, shape)` is one pattern match plus table look-ups."""

    def __init__(self, bound: BoundRuleset, rank: int) -> None:
        self.bound = bound
        self.rank = rank
        self.coords = bound.mesh.coords(rank)
        self.mesh = bound.mesh
        self._match = bound.match
        self._default = bound.default
        self._rules: dict[str, _RankRule] = {
            group: _RankRule(rule, self.coords, bound.group_numbers) for group, rule in bound.by_group.items()
        }

        self.decide: Callable[..., Decision] = self._make_decide()
        """`decide(key, shape=None)`: the decision for `key`; `shape` is needed by rules that select part of a
        tensor. A closure over this rank's tables: the per-key path reads locals, not attributes."""

    def _make_decide(self) -> Callable[..., Decision]:
        match = self._match
        rules = self._rules
        # Keyed by the number of the rule's outer group (`m.lastindex`), cheaper than its name.
        numbers = self.bound.group_numbers
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
        if _empty(selection):
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
        self.never = bound.drop or any(
            coords.get(axis, 0) not in pinned for axis, pinned in bound.pins.items()
        )
        self.checks = tuple(
            (p.name, p.group, p.strategy.slot_table(coords.get(p.axis, 0)), p) for p in bound.captures
        )
        self.dim_coords = tuple(coords.get(d.axis, 0) for d in bound.dims)
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


def rule_applies(rule: AnalyzedRule, params: Mapping[str, Any]) -> bool:
    """Whether every condition of the rule's `when` holds for `params`."""
    return all(params.get(name) == value for name, value in rule.spec.when.items())


def bind(program: Program, *, mesh: Mesh, params: Mapping[str, Any]) -> BoundRuleset:
    """Resolve sizes and strategies of every rule for `mesh` and `params` (already resolved)."""
    return BoundRuleset(program, mesh=mesh, params=params)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
