"""Checks against a checkpoint's keys and the whole mesh, in one pass over the entries.

Every key is matched once. Its owners come from the strategies' inverses (`ownership.compile.owners`, cached
per placed ids and shape), never from deciding rank after rank, and the same pass collects what the checks need:

- rules: how many keys each decided (dead and shadowed rules, absent layout variants);
- keys: unmatched keys, indices out of range, shapes that do not fit, shards that do not divide;
- integrity: each placed id's owners along its axis, each placed dim's coverage over its axis;
- local names per rank (only rules with a `rename` can collide);
- bytes per rank (`ownership.lint.balance`), tensors kept whole along an axis whose index they carry
  (`ownership.lint.replication`), coordinates left without experts or layers (`ownership.lint.spread`);
- LoRA pairs and ranks (`ownership.lint.lora`).

Example:
    >>> from ownership import load_ruleset
    >>> from ownership.loading.entries import KeyEntry
    >>> from ownership.lint.finding import LintReport
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=4", params={"num_experts": 10,
    ...                                           "expert_strategy": "vllm_contiguous"})
    >>> report = LintReport("vllm-ep-lora", "", "ep=4", 10)
    >>> check_keys(bound, [KeyEntry(f"m.experts.{e}.w.lora_A.weight") for e in range(10)], report)
    >>> sorted({f.check for f in report.findings})
    ['integrity', 'variant-absent']
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ownership.compile.bind import BoundRule, BoundRuleset
from ownership.compile.owners import rule_owners
from ownership.errors import DecisionError
from ownership.gcpause import paused_gc
from ownership.lint.balance import Balance
from ownership.lint.finding import LintReport
from ownership.lint.lora import LoraPairs, LoraRanks
from ownership.lint.quant import QuantCheck
from ownership.lint.replication import Replication
from ownership.lint.spread import Spread
from ownership.loading.entries import EntryLike, entry_nbytes, selected_nbytes
from ownership.placement.decision import DEFAULT_RULE
from ownership.placement.selection import Selection
from ownership.placement.strategy import Shard
from ownership.spec.program import Match, compile_fullmatch

__all__ = ["check_keys"]

_EXAMPLES = 3


@dataclass
class _Pass:
    bound: BoundRuleset
    report: LintReport
    balance: Balance
    replication: Replication
    decided: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unmatched: list[str] = field(default_factory=list)
    problems: dict[tuple[str, str | None, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    problem_text: dict[tuple[str, str | None, str], DecisionError] = field(default_factory=dict)
    lost: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    doubled: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    spread: Spread = field(default_factory=Spread)
    quant: QuantCheck | None = None
    local_names: dict[int, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    collisions: list[tuple[int, str, str, str]] = field(default_factory=list)
    pairs: LoraPairs = field(default_factory=LoraPairs)
    ranks: LoraRanks = field(default_factory=lambda: LoraRanks(None))
    owned_cache: dict[tuple[Any, ...], list[tuple[int, Selection, int, Mapping[str, int]]]] = field(
        default_factory=dict
    )
    coverage_cache: dict[tuple[str, tuple[int, ...]], list[tuple[str, str, list[int]]]] = field(
        default_factory=dict
    )


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
    state = _Pass(
        bound=bound, report=report, balance=Balance(bound.mesh.num_ranks), replication=Replication(bound)
    )
    if bound.family is not None:
        state.quant = QuantCheck(bound.family)
    state.ranks = LoraRanks(config)
    with paused_gc():
        for entry in entries:
            _visit(state, entry)
    _report_rules(state, entries)
    state.ranks.report(report)
    _report_keys(state)
    state.pairs.report(report)
    state.replication.report(report)
    state.spread.report(report)
    if state.quant is not None:
        state.quant.report(report)
    state.balance.report(report)


def _visit(state: _Pass, entry: EntryLike) -> None:
    bound = state.bound
    key = entry.key
    found = bound.classify(key)
    if state.quant is not None:
        state.quant.note(entry, DEFAULT_RULE if found is None else found[0].id)
    if found is None:
        if bound.default == "error":
            state.unmatched.append(key)
        elif bound.default == "replicate":
            state.balance.note_everywhere(DEFAULT_RULE, entry_nbytes(entry) or 0)
            state.replication.note(key, entry.shape, None)
            state.pairs.note(key, DEFAULT_RULE, entry.shape, dict.fromkeys(range(bound.mesh.num_ranks)))
        return
    rule, m = found
    state.decided[rule.id] += 1
    if rule.drop:
        return
    state.ranks.check(rule, entry)
    try:
        owned = _owned(state, rule, m, entry)
    except DecisionError as error:
        problem = (error.code or "decision", rule.id, error.message)
        state.problems[problem].append(key)
        state.problem_text.setdefault(problem, error)
        return
    state.replication.note(key, entry.shape, rule)
    selections: dict[int, Selection] = {}
    captures = rule.rule.captures(m) if rule.rule.rename is not None else {}
    rank_bytes: dict[int, int] = {}
    for rank, selection, nbytes, slots in owned:
        selections[rank] = selection
        rank_bytes[rank] = nbytes
        if rule.rule.rename is not None:
            local = rule.local_key(key, captures, slots)
            other = state.local_names[rank].get(local)
            if other is not None:
                state.collisions.append((rank, local, other, key))
            state.local_names[rank][local] = key
    state.balance.note(rule.id, key, rank_bytes)
    side = state.pairs.note(key, rule.id, entry.shape, selections)
    if side is not None and rule.dims and entry.shape is not None:
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(entry.shape, key), strict=True):
            mesh = bound.mesh
            side.ids[dim.name] = {
                rank: list(strategy.owned(mesh.coord(mesh.coords(rank), dim.axis))) for rank in selections
            }


def _owned(
    state: _Pass, rule: BoundRule, m: Match, entry: EntryLike
) -> list[tuple[int, Selection, int, Mapping[str, int]]]:
    """(rank, selection, bytes, local slots) of every owner (`rule_owners`); the same for every key with these
    ids, shape and dtype."""
    ids = _ids(state, rule, m, entry)
    suffix = entry.key.rpartition(".")[2] if rule.companion else ""
    cache_key = (rule.rule.index, suffix, ids, entry.shape, entry.dtype)
    owned = state.owned_cache.get(cache_key)
    if owned is None:
        shape = None if entry.shape is None else tuple(entry.shape)
        owned = state.owned_cache[cache_key] = [
            (o.rank, o.selection, selected_nbytes(entry, o.selection) or 0, o.slots)
            for o in rule_owners(state.bound, rule, ids, shape, key=entry.key)
        ]
    return owned


def _ids(state: _Pass, rule: BoundRule, m: Match, entry: EntryLike) -> tuple[int, ...]:
    key = entry.key
    ids = rule.placed_ids(m, key)
    state.spread.note(rule, ids, entry.shape)
    for placement, g in zip(rule.captures, ids, strict=True):
        owners = placement.strategy.owners(g)
        if not owners:
            state.lost[(rule.id, placement.name)].append(key)
        elif len(owners) > 1 and placement.strategy.name != "table":
            state.doubled[(rule.id, placement.name)].append(key)
    if rule.dims and not rule.companion:  # a companion's cut is its weight's, whose coverage is checked
        if entry.shape is None:
            rule.selection(None, (), key)  # raises shape-needed
        else:
            _dim_coverage(state, rule, tuple(entry.shape), key)
    return ids


def _dim_coverage(state: _Pass, rule: BoundRule, shape: tuple[int, ...], key: str) -> None:
    cache_key = (rule.id, shape)
    verdicts = state.coverage_cache.get(cache_key)
    if verdicts is None:
        verdicts = []
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(shape, key), strict=True):
            if strategy.exact or isinstance(strategy, Shard):
                # Each id once by construction, or replicated heads as declared: nothing to count.
                continue
            counts = [0] * strategy.num_ids
            for coord in range(strategy.num_coords):
                for g in strategy.owned(coord):
                    counts[g] += 1
            lost = [g for g, n in enumerate(counts) if n == 0]
            # A table may list an id on several coordinates: replicas, as declared.
            doubled = [] if strategy.name == "table" else [g for g, n in enumerate(counts) if n > 1]
            if lost:
                verdicts.append(("lost", dim.name, lost))
            if doubled:
                verdicts.append(("doubled", dim.name, doubled))
        state.coverage_cache[cache_key] = verdicts
    for kind, name, _ in verdicts:
        (state.lost if kind == "lost" else state.doubled)[(rule.id, name)].append(key)


def _report_rules(state: _Pass, entries: Sequence[EntryLike]) -> None:
    program = state.bound.program
    # A rule that decided no key: which keys would it match on its own, and which earlier rules took them?
    takers: dict[str, dict[str, list[str]]] = {}
    for rule in program.rules:
        if state.decided[rule.id]:
            continue
        alone = compile_fullmatch(rule.pattern.regex)
        found: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            if alone(entry.key):
                taker = program.classify(entry.key)
                assert taker is not None
                found[taker.rule.id].append(entry.key)
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


_KNOWN = {
    "index-out-of-range",
    "layout-mismatch",
    "layout-ambiguous",
    "shape-needed",
    "quant-misaligned",
    "quant-companion-shape",
    "bad-capture",
    "shard-does-not-divide",
    "limit",
}
