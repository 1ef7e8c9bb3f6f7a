"""Whole-mesh owners: every rank that owns a key, from the strategies' inverses, never by deciding rank after rank.

For a key's rule and the global ids of its placed captures, each placed axis contributes the coordinates that
hold the id (`Strategy.owners`), each pinned axis its pinned coordinates, and every other axis all of its
coordinates; their product is the owning ranks, each with its local slots and the coordinates that pick its
selection. `rule_owners` is that algorithm, cached per (rule, ids, shape) on the bound ruleset; `key_owners` is
`BoundRuleset.owners` (decisions per owning rank); the linter takes `rule_owners` as it is.

Example:
    >>> from ownership import load_ruleset
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=4", params={"num_experts": 10})
    >>> rule, match = bound.classify("m.layers.0.mlp.experts.7.w1.lora_A.weight")
    >>> rule_owners(bound, rule, rule.placed_ids(match, "k"), None, key="k")
    [Owner(rank=2, selection=None, slots={'expert': 1})]
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.selection import Selection, is_empty

if TYPE_CHECKING:
    from ownership.compile.bind import BoundRule, BoundRuleset

__all__ = ["Owner", "key_owners", "rule_owners"]


class Owner(NamedTuple):
    """One rank that owns a key: its selection of the tensor and the local slot of each placed capture."""

    rank: int
    selection: Selection
    slots: Mapping[str, int]


def key_owners(bound: BoundRuleset, key: str, shape: Sequence[int] | None) -> list[tuple[int, Decision]]:
    """Every rank that owns `key`, with its decision (`BoundRuleset.owners`)."""
    found = bound.classify(key)
    if found is None:
        if bound.default == "error":
            bound.unmatched(key)
        if bound.default == "drop":
            return []
        replicated = Decision(key, owned=True, rule=DEFAULT_RULE, local_key=key)
        return [(rank, replicated) for rank in bound.mesh.ranks()]
    rule, match = found
    if rule.drop:
        return []
    ids = rule.placed_ids(match, key)
    captures = rule.rule.captures(match)
    out: list[tuple[int, Decision]] = []
    for rank, selection, slots in rule_owners(
        bound, rule, ids, None if shape is None else tuple(shape), key=key
    ):
        local = rule.local_key(key, captures, slots)
        out.append((rank, _new(Decision, (key, True, rule.id, local, captures, selection))))
    return out


# Decision is a NamedTuple: building it from a tuple skips argument parsing.
_new = tuple.__new__


def rule_owners(
    bound: BoundRuleset, rule: BoundRule, ids: tuple[int, ...], shape: tuple[int, ...] | None, *, key: str
) -> list[Owner]:
    """The ranks that own a key of `rule` whose placed captures hold `ids`, for a tensor of `shape`; ranks whose
    selection would be empty are left out. `key` names the key in errors (a shape the layout does not fit).

    The same for every key with these ids and this shape, so it is cached on `bound`.
    """
    cache_key = (rule.rule.index, key.rpartition(".")[2] if rule.companion else "", ids, shape)
    cached = bound.owners_cache.get(cache_key)
    if cached is not None:
        return cached
    owners = []
    for rank, dim_coords, slots in _owner_coords(bound, rule, ids):
        selection = rule.selection(shape, dim_coords, key)
        if not is_empty(selection):
            owners.append(Owner(rank, selection, slots))
    bound.owners_cache[cache_key] = owners
    return owners


def _owner_coords(
    bound: BoundRuleset, rule: BoundRule, ids: tuple[int, ...]
) -> list[tuple[int, tuple[int, ...], dict[str, int]]]:
    """(rank, coordinates of the dim placements' axes, local slots) of every rank holding the placed ids."""
    mesh = bound.mesh
    sizes = dict(mesh.axes)
    # Each constraint: the declared axes it spans (several for a product axis such as ep=dp*tp), and the
    # coordinates it allows on them, flattened row-major, with the capture's name and local slot.
    constraints: list[tuple[tuple[str, ...], list[tuple[int, str | None, int]]]] = []
    for placement, g in zip(rule.captures, ids, strict=True):
        constraints.append(
            (
                mesh.components(placement.axis),
                [(c, placement.name, s) for c, s in placement.strategy.owners(g)],
            )
        )
    for axis, pinned in rule.pins.items():
        constraints.append((mesh.components(axis), [(coord, None, 0) for coord in pinned]))
    fixed: dict[str, int] = {}
    groups: list[tuple[tuple[str, ...], list[tuple[int, str | None, int]]]] = []
    for parts, allowed in constraints:
        if not parts:
            # An axis the mesh does not declare has one coordinate, 0: the key is owned only if 0 holds it.
            at_zero = [item for item in allowed if item[0] == 0]
            if not at_zero:
                return []
            fixed.update({name: slot for _, name, slot in at_zero if name})
        else:
            groups.append((parts, allowed))
    covered = {part for parts, _ in groups for part in parts}
    groups += [
        ((axis,), [(c, None, 0) for c in range(size)]) for axis, size in mesh.axes if axis not in covered
    ]
    dim_parts = [mesh.components(d.axis) for d in rule.dims]
    result = []
    for combo in itertools.product(*(allowed for _, allowed in groups)):
        coords: dict[str, int] = {}
        for (parts, _), (flat, _, _) in zip(groups, combo, strict=True):
            for part in reversed(parts):
                flat, coords[part] = divmod(flat, sizes[part])
        rank = 0
        for axis, size in mesh.axes:
            rank = rank * size + coords[axis]
        slots = {**fixed, **{name: slot for _, name, slot in combo if name is not None}}
        dim_coords = []
        for parts in dim_parts:
            value = 0
            for part in parts:
                value = value * sizes[part] + coords[part]
            dim_coords.append(value)
        result.append((rank, tuple(dim_coords), slots))
    result.sort(key=lambda item: item[0])
    return result
