"""Checks against a checkpoint's keys and the whole mesh, in one pass over the entries.

Every key is matched once. Its owners come from the strategies' inverses (`BoundRuleset.owner_ranks`, cached
per placed ids), never from deciding rank after rank, and the same pass collects what the checks need:

- rules: how many keys each decided (dead and shadowed rules, absent layout variants);
- keys: unmatched keys, indices out of range, shapes that do not fit, shards that do not divide;
- integrity: each placed id's owners along its axis, each placed dim's coverage over its axis;
- local names per rank (only rules with a `rename` can collide), LoRA pairs, bytes per rank.

Example:
    >>> from ownership import load_ruleset
    >>> from ownership.plan import KeyEntry
    >>> from ownership.lint.finding import LintReport
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=4", params={"num_experts": 10,
    ...                                           "expert_strategy": "vllm_contiguous"})
    >>> report = LintReport("vllm-ep-lora", "", "ep=4", 10)
    >>> check_keys(bound, [KeyEntry(f"m.experts.{e}.w.lora_A.weight") for e in range(10)], report)
    >>> sorted({f.check for f in report.findings})
    ['integrity', 'variant-absent']
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import regex as _regex

from ownership.compile import BoundRule, BoundRuleset
from ownership.errors import DecisionError
from ownership.gcpause import paused_gc
from ownership.lint.finding import LintReport
from ownership.plan import EntryLike, entry_nbytes, selected_nbytes
from ownership.selection import Selection, dim_indices, selection_shape

__all__ = ["check_keys"]

_EXAMPLES = 3


@dataclass
class _PairSide:
    rule: str
    shape: tuple[int, ...] | None
    selections: dict[int, Selection]
    ids: dict[str, dict[int, list[int]]] = field(default_factory=dict)


@dataclass
class _Pass:
    bound: BoundRuleset
    report: LintReport
    decided: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unmatched: list[str] = field(default_factory=list)
    problems: dict[tuple[str, str | None, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    problem_text: dict[tuple[str, str | None, str], DecisionError] = field(default_factory=dict)
    lost: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    doubled: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    bytes_per_rank: list[int] = field(default_factory=list)
    replicated_bytes: int = 0
    local_names: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    collisions: list[tuple[int, str, str, str]] = field(default_factory=list)
    pairs: dict[str, _PairSide] = field(default_factory=dict)
    owned_cache: dict[tuple[Any, ...], list[tuple[int, Selection, int, dict[str, int]]]] = field(
        default_factory=dict
    )
    coverage_cache: dict[tuple[str, tuple[int, ...]], list[tuple[str, str, list[int]]]] = field(
        default_factory=dict
    )
    ranks: frozenset[int] = frozenset()
    rank_seen: set[tuple[str, tuple[int, ...]]] = field(default_factory=set)
    bad_ranks: dict[tuple[str, int], list[str]] = field(default_factory=lambda: defaultdict(list))


def check_keys(
    bound: BoundRuleset,
    entries: Sequence[EntryLike],
    report: LintReport,
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Run every key and whole-mesh check over `entries`, adding findings to `report`.

    `config` (adapter_config.json merged with config.json) gives the adapter's ranks for `lora-rank`.
    """
    state = _Pass(bound=bound, report=report, bytes_per_rank=[0] * bound.mesh.num_ranks)
    state.ranks = adapter_ranks(config)
    with paused_gc():
        for entry in entries:
            _visit(state, entry)
    _report_rules(state, entries)
    _report_ranks(state)
    _report_keys(state)
    _report_pairs(state)
    _report_balance(state)


def _visit(state: _Pass, entry: EntryLike) -> None:
    bound = state.bound
    key = entry.key
    m = bound.match(key)
    if m is None:
        if bound.default == "error":
            state.unmatched.append(key)
        elif bound.default == "replicate":
            state.replicated_bytes += entry_nbytes(entry) or 0
            _note_pair(state, key, "<default>", entry.shape, dict.fromkeys(range(bound.mesh.num_ranks)))
        return
    rule = bound.by_group[m.lastgroup]
    state.decided[rule.id] += 1
    if rule.drop:
        return
    if (
        state.ranks
        and entry.shape is not None
        and rule.rule.layout is not None
        and "r" in rule.rule.layout.names
    ):
        _check_rank(state, rule, entry)
    try:
        owned = _owned(state, rule, m, entry)
    except DecisionError as error:
        problem = (error.code or "decision", rule.id, error.message)
        state.problems[problem].append(key)
        state.problem_text.setdefault(problem, error)
        return
    selections: dict[int, Selection] = {}
    captures = rule.rule.captures(m) if rule.rule.rename is not None else {}
    bytes_per_rank = state.bytes_per_rank
    for rank, selection, nbytes, slots in owned:
        selections[rank] = selection
        bytes_per_rank[rank] += nbytes
        if rule.rule.rename is not None:
            local = rule.local_key(key, captures, slots)
            other = state.local_names[rank].get(local)
            if other is not None:
                state.collisions.append((rank, local, other, key))
            state.local_names[rank][local] = key
    side = _note_pair(state, key, rule.id, entry.shape, selections)
    if side is not None and rule.dims and entry.shape is not None:
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(entry.shape, key), strict=True):
            axis_index = bound.mesh.names.index(dim.axis) if dim.axis in bound.mesh.names else None
            side.ids[dim.name] = {
                rank: list(strategy.owned(0 if axis_index is None else bound.mesh.coords(rank)[dim.axis]))
                for rank in selections
            }


_Owned = tuple[int, Selection, int, dict[str, int]]


def _owned(state: _Pass, rule: BoundRule, m: Any, entry: EntryLike) -> list[_Owned]:
    """(rank, selection, bytes, local slots) of every owner; the same for every key with these ids and shape."""
    ids = _ids(state, rule, m, entry)
    cache_key = (rule.id, ids, entry.shape, entry.dtype)
    owned = state.owned_cache.get(cache_key)
    if owned is None:
        owned = []
        for rank, dim_coords, slots in state.bound.owner_ranks(rule, ids):
            selection = rule.selection(entry.shape, dim_coords, entry.key)
            if selection is not None and any(dim is not None and not dim for dim in selection):
                continue
            owned.append((rank, selection, selected_nbytes(entry, selection) or 0, slots))
        state.owned_cache[cache_key] = owned
    return owned


def _ids(state: _Pass, rule: BoundRule, m: Any, entry: EntryLike) -> tuple[int, ...]:
    key = entry.key
    ids = []
    for placement in rule.captures:
        text = m.group(placement.group)
        if not text or not text.isdigit():
            raise rule.bad_capture(placement, text, key)
        g = rule.global_id(placement, int(text), key)
        owners = placement.strategy.owners(g)
        if not owners:
            state.lost[(rule.id, placement.name)].append(key)
        elif len(owners) > 1 and placement.strategy.name != "table":
            state.doubled[(rule.id, placement.name)].append(key)
        ids.append(g)
    if rule.dims:
        if entry.shape is None:
            rule.selection(None, (), key)  # raises shape-needed
        else:
            _dim_coverage(state, rule, tuple(entry.shape), key)
    return tuple(ids)


def _dim_coverage(state: _Pass, rule: BoundRule, shape: tuple[int, ...], key: str) -> None:
    cache_key = (rule.id, shape)
    verdicts = state.coverage_cache.get(cache_key)
    if verdicts is None:
        verdicts = []
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(shape, key), strict=True):
            counts = [0] * strategy.num_ids
            for coord in range(strategy.num_coords):
                for g in strategy.owned(coord):
                    counts[g] += 1
            lost = [g for g, n in enumerate(counts) if n == 0]
            declared = strategy.name == "table" or any(
                p.heads is not None and p.heads < strategy.num_coords for p in getattr(strategy, "parts", ())
            )
            doubled = [] if declared else [g for g, n in enumerate(counts) if n > 1]
            if lost:
                verdicts.append(("lost", dim.name, lost))
            if doubled:
                verdicts.append(("doubled", dim.name, doubled))
        state.coverage_cache[cache_key] = verdicts
    for kind, name, _ in verdicts:
        (state.lost if kind == "lost" else state.doubled)[(rule.id, name)].append(key)


def _note_pair(
    state: _Pass, key: str, rule: str, shape: tuple[int, ...] | None, selections: dict[int, Selection]
) -> _PairSide | None:
    if "lora_A" not in key and "lora_B" not in key:
        return None
    side = _PairSide(rule=rule, shape=None if shape is None else tuple(shape), selections=selections)
    state.pairs[key] = side
    return side


def _report_rules(state: _Pass, entries: Sequence[EntryLike]) -> None:
    program = state.bound.program
    # A rule that decided no key: which keys would it match on its own, and which earlier rules took them?
    takers: dict[str, dict[str, list[str]]] = {}
    for rule in program.rules:
        if state.decided[rule.id]:
            continue
        alone = _alone(rule.pattern.regex)
        found: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            if alone(entry.key):
                found[program.rule_of(program.match(entry.key)).id].append(entry.key)
        takers[rule.id] = found
    variants: dict[str, list[str]] = defaultdict(list)
    for rule in program.rules:
        if rule.spec.variant is not None:
            variants[rule.spec.variant].append(rule.id)
    present = {v for v, ids in variants.items() if any(state.decided[r] or takers.get(r) for r in ids)}
    for variant, ids in variants.items():
        if variant not in present and present:
            state.report.add(
                "variant-absent",
                f"no key uses layout variant {variant!r} (rules {', '.join(ids)}); this checkpoint uses "
                f"{', '.join(sorted(present))}",
            )
    if variants and not present:
        state.report.add(
            "dead-rule",
            f"no key matches any layout variant ({', '.join(sorted(variants))})",
            rule=", ".join(r for ids in variants.values() for r in ids),
            fix="check the patterns against the checkpoint's keys (`ownership plan RULESET CHECKPOINT --all-ranks`), or use "
            "another ruleset",
        )
    for rule in program.rules:
        if rule.id not in takers:
            continue
        taken = takers[rule.id]
        if taken and not rule.spec.optional:
            state.report.add(
                "shadowed-rule",
                f"every key it matches is taken first by rule {', '.join(sorted(taken))}",
                rule=rule.id,
                keys=[k for keys in taken.values() for k in keys][:_EXAMPLES],
                fix="move it above the rule that takes its keys, or narrow that rule's pattern",
                data={
                    "taken_by": {r: len(k) for r, k in taken.items()},
                    "num_keys": sum(len(k) for k in taken.values()),
                },
            )
        elif not rule.spec.optional and (rule.spec.variant is None or rule.spec.variant in present):
            own = rule.spec.match or rule.spec.regex or ""
            state.report.add(
                "dead-rule",
                f"pattern {own!r} matches no key of the checkpoint",
                rule=rule.id,
                fix="fix the pattern against the checkpoint's keys, or remove the rule",
            )


def _alone(regex: str) -> Any:
    try:
        return re.compile(regex).fullmatch
    except re.error:
        return _regex.compile(regex).fullmatch


def _report_keys(state: _Pass) -> None:
    report = state.report
    if state.unmatched:
        report.add(
            "unmatched-key",
            f'{len(state.unmatched)} keys match no rule and the ruleset\'s default is "error"',
            keys=state.unmatched[:_EXAMPLES],
            fix='add rules for them, or set default = "replicate" or "drop"',
            data={"num_keys": len(state.unmatched)},
        )
    for (code, rule, message), keys in state.problems.items():
        error = state.problem_text[(code, rule, message)]
        detail = ", ".join(
            part
            for part in (
                error.found and f"found {error.found}",
                error.expected and f"expected {error.expected}",
            )
            if part
        )
        report.add(
            code if code in _KNOWN else "layout-mismatch",
            f"{message}"
            + (f" ({detail})" if detail else "")
            + (f" in {len(keys)} keys" if len(keys) > 1 else ""),
            rule=rule,
            keys=keys[:_EXAMPLES],
            fix=error.fix,
            data={"num_keys": len(keys)},
        )
    for (rule, name), keys in state.lost.items():
        report.add(
            "integrity",
            f"some {name} ids are owned by no rank: {len(keys)} keys would be lost",
            rule=rule,
            keys=keys[:_EXAMPLES],
            fix=f"use a strategy that covers every {name} (linear, round_robin), or check the size",
        )
    for (rule, name), keys in state.doubled.items():
        report.add(
            "integrity",
            f"some {name} ids are owned by several ranks of one replica group: {len(keys)} keys loaded twice",
            rule=rule,
            keys=keys[:_EXAMPLES],
            fix="use a strategy that places each id once, or a table to declare the replicas",
        )
    for rank, local, first, second in state.collisions[:_EXAMPLES]:
        report.add(
            "local-name-collision",
            f"{first!r} and {second!r} both get the local name {local!r} on rank {rank}",
            keys=[first, second],
            fix="make the rename keep what tells the keys apart (e.g. {layer})",
            data={"count": len(state.collisions)},
        )


_KNOWN = {"index-out-of-range", "layout-mismatch", "shape-needed", "bad-capture", "shard-does-not-divide"}


def _report_pairs(state: _Pass) -> None:
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, a in state.pairs.items():
        if "lora_A" not in key:
            continue
        head, _, tail = key.rpartition("lora_A")
        b = state.pairs.get(f"{head}lora_B{tail}")
        if b is None:
            continue
        problem = _pair_problem(a, b)
        if problem is not None:
            rules = a.rule if a.rule == b.rule else f"{a.rule} / {b.rule}"
            grouped[(rules, problem)] += [key, f"{head}lora_B{tail}"]
    for (rules, problem), keys in grouped.items():
        count = len(keys) // 2
        state.report.add(
            "lora-pair",
            problem + (f" (in {count} pairs)" if count > 1 else ""),
            rule=rules,
            keys=keys[:2],
            fix="place lora_A and lora_B of a module with the same strategy and split (column: B on out; "
            "row: A on in; the r dim alike on both)",
            data={"count": count},
        )


def _pair_problem(a: _PairSide, b: _PairSide) -> str | None:
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


def _check_rank(state: _Pass, rule: BoundRule, entry: EntryLike) -> None:
    assert entry.shape is not None and rule.rule.layout is not None
    shape = tuple(entry.shape)
    cache_key = (rule.id, shape)
    if cache_key in state.rank_seen:
        return
    state.rank_seen.add(cache_key)
    layout = rule.rule.layout
    try:
        sizes = layout.resolve(shape, known=rule.known_sizes, key=entry.key, rule=rule.id, source=rule.source)
    except DecisionError:
        return  # a layout that does not fit is reported by its own check
    d, f = layout.where("r")
    if sizes[d][f] not in state.ranks:
        state.bad_ranks[(rule.id, sizes[d][f])].append(entry.key)


def _report_ranks(state: _Pass) -> None:
    allowed = sorted(state.ranks)
    for (rule, found), keys in state.bad_ranks.items():
        state.report.add(
            "lora-rank",
            f"the layout gives r = {found}, but the adapter's ranks are {allowed} (r and rank_pattern)",
            rule=rule,
            keys=keys[:_EXAMPLES],
            fix="check the param behind the factor folded with r (e.g. num_experts) against the model, or the "
            "layout against the tensor",
            data={"r": found, "ranks": allowed},
        )


def _report_balance(state: _Pass) -> None:
    per_rank = [n + state.replicated_bytes for n in state.bytes_per_rank]
    if not any(per_rank):
        return
    mean = sum(per_rank) / len(per_rank)
    peak = max(per_rank)
    state.report.add(
        "byte-balance",
        f"bytes per rank: max {peak} on rank {per_rank.index(peak)}, mean {mean:.0f}, max/mean {peak / mean:.3f}",
        data={"bytes_per_rank": per_rank, "max_over_mean": round(peak / mean, 4)},
    )
