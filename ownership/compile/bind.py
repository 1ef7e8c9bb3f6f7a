"""Binding: a ruleset's program with params and a mesh resolved, rule by rule, once.

`bind(program, mesh=..., params=...)` resolves every size and strategy. A `BoundRule` then answers, for one rule,
the selection of a tensor of a given shape on given coordinates (computed once per (shape, coordinates)), local
names, and the checked global ids of a key's placed captures. `BoundRuleset` holds the rules of the ruleset
that apply to the params (`when`), and gives the two ways of deciding: `for_rank(rank)` (`ownership.compile.rank`,
one rank, one match per key) and `owners(key, shape)` (`ownership.compile.owners`, every rank at once from the
strategies' inverses).

Example:
    >>> from ownership.spec.schema import parse_ruleset
    >>> from ownership.spec.program import analyze
    >>> from ownership.placement.mesh import Mesh
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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ownership import limits
from ownership.compile.owners import Owner, key_owners
from ownership.compile.rank import RankRules
from ownership.errors import DecisionError, MeshError, RulesetError, did_you_mean, one_of, short
from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.mesh import REPLICATION_AXES, Mesh
from ownership.placement.selection import DimSelection, Run, Selection, normalize_selection, runs_from_indices
from ownership.placement.strategy import Layers, Part, Shard, Strategy, make_strategy
from ownership.spec.layout import Layout
from ownership.spec.params import evaluate_size, known_size
from ownership.spec.program import AnalyzedRule, Match, Program
from ownership.spec.quant import Family
from ownership.spec.schema import STRATEGIES, PlacementSpec

__all__ = [
    "BoundRule",
    "BoundRuleset",
    "CapturePlacement",
    "DimPlacement",
    "bind",
    "compose_runs",
    "rule_applies",
]


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

    companion = False
    """Whether it decides a quantized weight's companions (`ownership.compile.quant.CompanionRule`)."""

    def __init__(
        self,
        rule: AnalyzedRule,
        *,
        mesh: Mesh,
        params: Mapping[str, Any],
        source: str,
        model_dims: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.rule = rule
        self.id = rule.id
        self.mesh = mesh
        self.params = params
        self.source = source
        self.drop = rule.spec.drop
        self.captures = tuple(
            self._bind_capture(name, group, placement) for name, (group, placement) in rule.captured.items()
        )
        # A dim placed on an axis that a capture is already split over on this mesh (tp inside the product axis
        # ep=dp*tp) is not cut again: under vLLM's expert parallelism an expert is whole on its rank.
        taken = {part for capture in self.captures for part in mesh.components(capture.axis)}
        self.dims = tuple(
            DimPlacement(name, placement.over, placement, self._strategy_name(placement, name))
            for name, placement in rule.dims.items()
            if not taken & set(mesh.components(placement.over))
        )
        self.pins: dict[str, tuple[int, ...]] = {
            axis: tuple(
                sorted(
                    {self._pin_coord(axis, at) for at in (pinned if isinstance(pinned, list) else [pinned])}
                )
            )
            for axis, pinned in rule.spec.pin.items()
        }
        self.known_sizes: dict[str, int] = {}
        self.size_origins: dict[str, str] = {}
        """The model size (a param such as `hidden_size`) behind a known size, for the error when a tensor does
        not fit it."""
        for name, ref in rule.spec.sizes.items():
            size = known_size(ref, params, rule=self.id, source=source)
            if size is not None:
                self.known_sizes[name] = size
                if isinstance(ref, str):
                    self.size_origins[name] = ref
        for dim in self.dims:
            if dim.spec.size is not None:
                self.known_sizes[dim.name] = evaluate_size(dim.spec.size, params, rule=self.id, source=source)
        names = {name for layout in rule.layouts for name in layout.names}
        for name, (size, origin) in (model_dims or {}).items():
            if name in names and name not in self.known_sizes:
                self.known_sizes[name] = size
                self.size_origins[name] = origin
        # Axes of size 1 cut nothing: a tensor whose rule places dims only on them is whole, shape or not.
        self.cuts = any(mesh.size(dim.axis) > 1 for dim in self.dims)
        self.pads = any(dim.spec.pad is not None and mesh.size(dim.axis) > 1 for dim in self.dims)
        """Whether a dim is padded (the vocab), for the plan's padding report."""
        self._selection_cache: dict[tuple[tuple[int, ...], tuple[int, ...]], Selection] = {}
        self._layout_cache: dict[tuple[int, ...], tuple[Layout, tuple[tuple[int, ...], ...]]] = {}

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
        if num_ids > limits.MAX_INDEX_SIZE:
            # Every rank holds a slot per id: a size from a hostile config must not allocate without bound.
            raise limits.over_limit(
                f"the size of index {name!r}",
                name="MAX_INDEX_SIZE",
                found=f"{size_text} ids",
                error=RulesetError,
                source=self.source,
                rule=self.id,
                fix=f"check the param behind the size of {name!r} against the model's config",
            )
        sizes = None
        if strategy_name == "layers":
            sizes = self._stage_sizes(placement, num_ids, num_coords)
            extra = 0
            if placement.extra is not None:
                extra = known_size(placement.extra, self.params, rule=self.id, source=self.source) or 0
            if extra:
                # The MTP layers run on the last stage only, whatever the split of the others.
                sizes = list(sizes or Layers(num_ids, num_coords).stage_sizes())
                sizes[-1] += extra
                size_text = f"{size_text} + {placement.extra}={extra}"
                num_ids += extra
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
                found=short(table),
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
                found=short(sizes),
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

    def placed_ids(self, match: Match, key: str) -> tuple[int, ...]:
        """The global id of each placed capture of `key`, checked against its size."""
        ids = []
        for placement in self.captures:
            text = match.group(placement.group)
            if not text or not text.isdigit():
                raise self.bad_capture(placement, text, key)
            ids.append(self.global_id(placement, int(text), key))
        return tuple(ids)

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
        if not self.dims or (shape is None and not self.cuts):
            return None
        if shape is None:
            axes = sorted({dim.axis for dim in self.dims if self.mesh.size(dim.axis) > 1})
            raise DecisionError(
                f"this rule cuts the tensor over {', '.join(axes)} and needs its shape",
                source=self.source,
                key=key,
                rule=self.id,
                expected="a shape",
                fix="give the tensor's shape: plan or lint a checkpoint (its headers have it) or a key list with "
                "shapes (key<TAB>dtype<TAB>[d0,d1]), pass shape= in Python, or --shape to `ownership explain`",
                code="shape-needed",
            )
        cache_key = (shape, dim_coords)
        cached = self._selection_cache.get(cache_key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        selection = self._compute_selection(shape, dim_coords, key)
        self._selection_cache[cache_key] = selection
        return selection

    def resolve(self, shape: tuple[int, ...], key: str) -> tuple[Layout, tuple[tuple[int, ...], ...]]:
        """The layout this tensor is stored in and its factor sizes: of the rule's orientations, the one the
        shape and the model's sizes fit. None fitting, or several that would cut it differently, is a
        `DecisionError` naming the key."""
        cached = self._layout_cache.get(shape)
        if cached is not None:
            return cached
        fits: list[tuple[Layout, tuple[tuple[int, ...], ...]]] = []
        first_error: DecisionError | None = None
        for layout in self.rule.layouts:
            try:
                sizes = layout.resolve(
                    shape,
                    known=self.known_sizes,
                    key=key,
                    rule=self.id,
                    source=self.source,
                    origins=self.size_origins,
                )
            except DecisionError as error:
                first_error = first_error or error
                continue
            fits.append((layout, sizes))
        if not fits:
            assert first_error is not None
            if len(self.rule.layouts) > 1:
                raise DecisionError(
                    f"the tensor fits none of the rule's layouts {[layout.source for layout in self.rule.layouts]}",
                    source=self.source,
                    key=key,
                    rule=self.id,
                    found=f"shape {list(shape)}",
                    expected=" or ".join(self._describe(layout) for layout in self.rule.layouts),
                    fix="check the model's sizes (config.json) against the checkpoint, or the rule's layouts",
                    code="layout-mismatch",
                ) from None
            raise first_error
        if len({self._cut_signature(layout, sizes) for layout, sizes in fits}) > 1:
            moved = [
                name
                for name in fits[0][0].names
                if name not in self.known_sizes and len({layout.where(name) for layout, _ in fits}) > 1
            ]
            raise DecisionError(
                f"the tensor fits several of the rule's layouts, which cut it differently: "
                f"{', '.join(repr(layout.source) for layout, _ in fits)}",
                source=self.source,
                key=key,
                rule=self.id,
                found=f"shape {list(shape)}",
                expected="one layout that the shape and the model's sizes fit",
                fix=f"give the rule the model's size of {' or '.join(moved)} (in `sizes` or the ruleset's "
                "[dims], from a param the model's config.json has) so the shape tells the orientations apart",
                code="layout-ambiguous",
            )
        self._layout_cache[shape] = fits[0]
        return fits[0]

    def _describe(self, layout: Layout) -> str:
        known = ", ".join(f"{n}={self.known_sizes[n]}" for n in layout.names if n in self.known_sizes)
        return f"{layout.source!r}" + (f" with {known}" if known else "")

    def _cut_signature(self, layout: Layout, sizes: tuple[tuple[int, ...], ...]) -> tuple[Any, ...]:
        """Where the dims that are really cut sit, and the factor sizes of their dims: equal for two layouts
        that select the same elements."""
        out = []
        for dim in self.dims:
            if self.mesh.size(dim.axis) > 1:
                d, f = layout.where(dim.name)
                out.append((dim.name, d, f, sizes[d]))
        return tuple(out)

    def dim_strategies(self, shape: tuple[int, ...], key: str) -> tuple[tuple[int, int, Strategy], ...]:
        """For each dim placement: (dim, factor position, strategy over its factor size)."""
        layout, sizes = self.resolve(shape, key)
        out = []
        for dim in self.dims:
            d, f = layout.where(dim.name)
            if shape[d] > limits.MAX_CUT_DIM:
                # A cut dim's owned indices are listed to make its runs.
                raise limits.over_limit(
                    f"dim {d} of the tensor, which the rule cuts,",
                    name="MAX_CUT_DIM",
                    found=f"size {shape[d]:,}",
                    error=DecisionError,
                    source=self.source,
                    rule=self.id,
                    key=key,
                    fix="check the tensor's shape",
                )
            out.append((d, f, self._dim_strategy(dim, sizes[d][f], key)))
        return tuple(out)

    def padding(
        self, shape: tuple[int, ...], coords: Mapping[str, int], key: str
    ) -> list[tuple[int, int, int]]:
        """(dim, real rows, rows with padding) of each padded dim whose share on these coordinates is short of
        the padded chunk: what vLLM allocates and fills with zeros past the real rows."""
        out = []
        for dim, (d, _, strategy) in zip(self.dims, self.dim_strategies(shape, key), strict=True):
            if isinstance(strategy, Shard) and strategy.pad is not None:
                rows = len(strategy.owned(coords.get(dim.axis, 0)))
                if rows < strategy.chunk:
                    out.append((d, rows, strategy.chunk))
        return out

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
            pad=spec.pad,
            align=spec.align,
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
        _, sizes = self.resolve(shape, key)
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

    def __init__(
        self, program: Program, *, mesh: Mesh, params: Mapping[str, Any], family: Family | None = None
    ) -> None:
        _check_axes(program, mesh)
        model_dims: dict[str, tuple[int, str]] = {}
        for name, ref in program.spec.dims.items():
            size = known_size(ref, params, rule=None, source=program.source)
            if size is not None:
                model_dims[name] = (size, str(ref))
        active = tuple(rule for rule in program.rules if rule_applies(rule, params))
        if len(active) != len(program.rules):
            program = program.subset(active)
        if family is not None:
            program = program.with_companions(family.companion_suffixes)
        self.program = program
        self.mesh = mesh
        self.params = dict(params)
        self.default = program.spec.default
        self.family = family
        """The quantization family of the checkpoint (`ownership.spec.quant`), or None."""
        bases = {
            rule.index: BoundRule(
                rule, mesh=mesh, params=params, source=program.source, model_dims=model_dims
            )
            for rule in program.rules
            if rule.companion_of is None
        }
        rules: list[BoundRule] = []
        for rule in program.rules:
            if rule.companion_of is None:
                rules.append(bases[rule.index])
            else:
                from ownership.compile.quant import CompanionRule  # it builds on BoundRule

                assert family is not None
                rules.append(
                    CompanionRule(
                        rule,
                        base=bases[rule.companion_of],
                        family=family,
                        mesh=mesh,
                        params=params,
                        source=program.source,
                    )
                )
        self.rules = tuple(rules)
        self.by_index = {rule.rule.index: rule for rule in self.rules}
        self.by_id = {rule.id: rule for rule in self.rules if not rule.companion}
        # The program's branch of each rule, to its bound rule: `classify` runs once per key of whole-mesh work.
        self._match = program.match
        self._by_group = {group: self.by_index[rule.index] for group, rule in program.by_group.items()}
        self.owners_cache: dict[tuple[int, str, tuple[int, ...], tuple[int, ...] | None], list[Owner]] = {}

    def classify(self, key: str) -> tuple[BoundRule, Match] | None:
        """The bound rule that decides `key`, with its match; None when no rule matches."""
        m = self._match(key)
        return None if m is None else (self._by_group[m.lastgroup], m)

    def rule_id(self, key: str) -> str:
        """The id of the rule that decides `key`, or `<default>`."""
        found = self.program.classify(key)
        return DEFAULT_RULE if found is None else found.rule.id

    def for_rank(self, rank: int) -> RankRules:
        """The decision function of one rank (`decide(key, shape=None)`)."""
        return RankRules(self, rank)

    def owners(self, key: str, shape: Sequence[int] | None = None) -> list[tuple[int, Decision]]:
        """Every rank that owns `key`, with its decision, from the strategies' inverses."""
        return key_owners(self, key, shape)

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


def _check_axes(program: Program, mesh: Mesh) -> None:
    """Every axis of the mesh is one the ruleset places or a replication axis: a misspelt axis would otherwise be
    an axis nothing is split over, and every rank would load everything."""
    placed = program.spec.axes
    for axis in [*mesh.names, *(name for name, _ in mesh.derived)]:
        if axis in placed or axis in REPLICATION_AXES or axis in program.spec.replicated_axes:
            continue
        close = did_you_mean(axis, [a for a in placed if a not in mesh.names] or placed)
        raise MeshError(
            f"the mesh {mesh} has an axis {axis!r} that ruleset {program.spec.name!r} does not place",
            source=program.source,
            found=repr(axis),
            expected=f"one of the ruleset's axes ({', '.join(placed)}) or a replication axis "
            f"({', '.join([*program.spec.replicated_axes, *REPLICATION_AXES])})",
            fix="correct the axis"
            + (f" (did you mean {one_of(close)}?)" if close else "")
            + ", or use a ruleset that places it (`ownership rules list` shows their axes)",
            code="mesh-axis",
        )


def rule_applies(rule: AnalyzedRule, params: Mapping[str, Any]) -> bool:
    """Whether every condition of the rule's `when` holds for `params`."""
    return all(params.get(name) == value for name, value in rule.spec.when.items())


def bind(
    program: Program, *, mesh: Mesh, params: Mapping[str, Any], family: Family | None = None
) -> BoundRuleset:
    """Resolve sizes and strategies of every rule for `mesh` and `params` (already resolved); with a
    quantization `family`, the rules for linear weights also decide the family's companions."""
    return BoundRuleset(program, mesh=mesh, params=params, family=family)
