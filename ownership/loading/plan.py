"""Plans: the decisions of one rank (or of every rank) over a checkpoint's entries, with byte totals.

A plan is plain data: inspectable (`owned`), printable, serialisable (`to_json()`, the format documented in
docs/plan-json.md) and explainable per key. `plan(ruleset, source, ...)` reads the entries of any source
(`ownership.loading.entries`): from checkpoint headers, or from a key list where dtype and shape may be unknown
(then bytes are not counted and rules that select part of a tensor need a shape).

Example:
    >>> result = plan(
    ...     "vllm-ep-lora",
    ...     ["m.layers.0.mlp.experts.5.w1.lora_A.weight", "m.layers.0.self_attn.q_proj.lora_A.weight"],
    ...     mesh="ep=4", rank=2, params={"num_experts": 8})
    >>> [d.key for d in result.owned]
    ['m.layers.0.mlp.experts.5.w1.lora_A.weight', 'm.layers.0.self_attn.q_proj.lora_A.weight']
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any, NamedTuple

from ownership.compile.bind import BoundRuleset
from ownership.errors import DecisionError
from ownership.formats.dtypes import dtype_itemsize
from ownership.gcpause import paused_gc
from ownership.loading.entries import EntryLike, Source, entries_from, entry_nbytes
from ownership.placement.decision import Decision
from ownership.placement.mesh import MeshLike
from ownership.ruleset import RulesetLike, resolve_ruleset
from ownership.spec.params import merge_configs

__all__ = ["MeshPlan", "Padding", "Plan", "PlanBuilder", "build_mesh_plan", "build_plan", "plan"]


def plan(
    ruleset: RulesetLike,
    source: Source,
    *,
    mesh: MeshLike,
    rank: int | None = None,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    force_config: bool = False,
) -> Plan | MeshPlan:
    """Decide every entry of `source` for `rank`, or for every rank when `rank` is None.

    `ruleset` is a `Ruleset`, a built-in name, a `model_type`, a rule file or `"auto"` (the built-in for the
    checkpoint's `model_type`, with `config` laid over its config). `source` is a checkpoint path
    (file or folder; params such as `num_experts` are then also read from its config.json), an open checkpoint,
    entries, keys, or `(key, dtype, shape)` triples. `config` (for an adapter, its base model's config.json) is
    laid over the checkpoint's own; one of another `model_type` is an error unless `force_config`.
    """
    entries, own_config = entries_from(source)
    merged = merge_configs(own_config, config, force=force_config)
    bound = resolve_ruleset(ruleset, merged).bind(mesh=mesh, params=params, config=merged)
    if rank is None:
        return build_mesh_plan(bound, entries)
    return build_plan(bound, entries, rank=rank)


class Padding(NamedTuple):
    """A padded dim of an owned tensor: this rank reads `rows` real rows of the `padded_rows` it holds."""

    key: str
    dim: int
    rows: int
    padded_rows: int


@dataclass
class Plan:
    """One rank's owned decisions over a checkpoint's entries (`owned[i]` decides `entries[index[i]]`)."""

    rank: int
    coords: dict[str, int]
    entries: list[EntryLike]
    owned: list[Decision]
    index: list[int]
    ruleset: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    padding: list[Padding] = field(default_factory=list)
    """Owned tensors whose share is short of what vLLM allocates for it (a padded vocab)."""

    def owned_entries(self) -> Iterator[tuple[EntryLike, Decision]]:
        """(entry, decision) of every owned key, in checkpoint order."""
        for i, decision in zip(self.index, self.owned, strict=True):
            yield self.entries[i], decision

    @property
    def bytes_total(self) -> int:
        """Bytes of every entry of the checkpoint (0 where dtype or shape is unknown)."""
        # Once per entry of a checkpoint that may hold tens of thousands: no selection to apply.
        total = 0
        for entry in self.entries:
            dtype, shape = entry.dtype, entry.shape
            if dtype is not None and shape is not None:
                total += prod(shape) * dtype_itemsize(dtype)
        return total

    @property
    def bytes_owned(self) -> int:
        """Bytes of the parts this rank owns."""
        return sum(entry_nbytes(e, d) or 0 for e, d in self.owned_entries())

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "coords": self.coords,
            "owned": [d.to_json() for d in self.owned],
            "bytes_owned": self.bytes_owned,
            **({"padding": [p._asdict() for p in self.padding]} if self.padding else {}),
        }


@dataclass
class MeshPlan:
    """Every rank's plan over one checkpoint, built from the strategies' inverses in one pass over the keys."""

    ranks: list[Plan]
    ruleset: str
    mesh: dict[str, int]
    params: dict[str, Any]

    @property
    def bytes_total(self) -> int:
        return self.ranks[0].bytes_total if self.ranks else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ruleset": self.ruleset,
            "mesh": self.mesh,
            "params": self.params,
            "bytes_total": self.bytes_total,
            "ranks": [plan.to_json() for plan in self.ranks],
        }


def build_plan(bound: BoundRuleset, entries: Iterable[EntryLike], *, rank: int) -> Plan:
    """Decide every entry for one rank; two owned keys with one local name are an error."""
    builder = PlanBuilder(bound, entries, rank=rank)
    with paused_gc():
        for _ in builder.owned_entries():
            pass
    return builder.plan()


class PlanBuilder:
    """One rank's plan, decided entry by entry: a loader can read the first owned keys while later ones are
    still being decided (`owned_entries`), then take the finished `plan()`.

    Example:
        >>> from ownership import load_ruleset
        >>> from ownership.loading.entries import KeyEntry
        >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=2", params={"num_experts": 4})
        >>> builder = PlanBuilder(bound, [KeyEntry("m.experts.0.w"), KeyEntry("m.experts.3.w")], rank=1)
        >>> [entry.key for entry, _ in builder.owned_entries()]
        ['m.experts.3.w']
        >>> builder.plan().index
        [1]
    """

    def __init__(self, bound: BoundRuleset, entries: Iterable[EntryLike], *, rank: int) -> None:
        self.bound = bound
        self.rank = rank
        self.rules = bound.for_rank(rank)
        self.entries: list[EntryLike] = []
        self.owned: list[Decision] = []
        self.index: list[int] = []
        # Entries are taken as they come: a checkpoint may still be listing its header.
        self._source = iter(entries)

    def owned_entries(self) -> Iterator[tuple[EntryLike, Decision]]:
        """Decide the entries not yet decided, in checkpoint order, yielding the owned ones as they are decided."""
        decide, owned, index, entries = self.rules.decide, self.owned, self.index, self.entries
        for entry in self._source:
            i = len(entries)
            entries.append(entry)
            decision = decide(entry.key, entry.shape)
            if decision.owned:
                owned.append(decision)
                index.append(i)
                yield entry, decision

    def plan(self) -> Plan:
        """The plan, deciding whatever `owned_entries` has not; checks that local names are unique."""
        for _ in self.owned_entries():
            pass
        _check_local_names(self.owned, self.rank)
        coords = self.rules.coords
        return Plan(
            rank=self.rank,
            coords=coords,
            entries=self.entries,
            owned=self.owned,
            index=self.index,
            ruleset=self.bound.program.spec.name,
            params=self.bound.params,
            padding=_padding(self.bound, self.entries, self.owned, self.index, coords),
        )


def build_mesh_plan(bound: BoundRuleset, entries: Iterable[EntryLike]) -> MeshPlan:
    """Every rank's plan in one pass: each key's owners come from the strategies' inverses."""
    entry_list = list(entries)
    mesh = bound.mesh
    owned: list[list[Decision]] = [[] for _ in range(mesh.num_ranks)]
    index: list[list[int]] = [[] for _ in range(mesh.num_ranks)]
    with paused_gc():
        for i, entry in enumerate(entry_list):
            for rank, decision in bound.owners(entry.key, entry.shape):
                owned[rank].append(decision)
                index[rank].append(i)
    plans = []
    for rank in range(mesh.num_ranks):
        _check_local_names(owned[rank], rank)
        coords = mesh.coords(rank)
        plans.append(
            Plan(
                rank=rank,
                coords=coords,
                entries=entry_list,
                owned=owned[rank],
                index=index[rank],
                ruleset=bound.program.spec.name,
                params=bound.params,
                padding=_padding(bound, entry_list, owned[rank], index[rank], coords),
            )
        )
    return MeshPlan(ranks=plans, ruleset=bound.program.spec.name, mesh=dict(mesh.axes), params=bound.params)


def _padding(
    bound: BoundRuleset,
    entries: Sequence[EntryLike],
    owned: Sequence[Decision],
    index: Sequence[int],
    coords: Mapping[str, int],
) -> list[Padding]:
    padded = {rule.id for rule in bound.rules if rule.pads}
    if not padded:
        return []
    out = []
    for decision, i in zip(owned, index, strict=True):
        shape = entries[i].shape
        if decision.rule in padded and shape is not None:
            rule = bound.by_id[decision.rule]
            for dim, rows, padded_rows in rule.padding(tuple(shape), coords, decision.key):
                out.append(Padding(decision.key, dim, rows, padded_rows))
    return out


def _check_local_names(decisions: Sequence[Decision], rank: int) -> None:
    seen: dict[str, Decision] = {}
    for decision in decisions:
        if decision.local_key is None:
            continue
        other = seen.get(decision.local_key)
        if other is not None:
            raise DecisionError(
                f"two keys get the local name {decision.local_key!r} on rank {rank}",
                key=decision.key,
                rule=decision.rule,
                found=f"{other.key!r} (rule {other.rule!r}) and {decision.key!r} (rule {decision.rule!r})",
                expected="one key per local name on a rank",
                fix="make the rename keep what tells the keys apart (e.g. the layer: {layer})",
                code="local-name-collision",
            )
        seen[decision.local_key] = decision
