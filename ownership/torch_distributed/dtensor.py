"""Where each local tensor of a rank sits in the checkpoint's tensor: DTensor placements, global ids, and the
DTensors themselves.

`shard_specs(plan, bound=...)` gives, for every owned key of a rank's plan, a `ShardSpec`: the checkpoint key and
its global shape, the global ids of every placed index the rank holds (captured from the key, such as an
expert id, or a layout dim's owned ids), and, where `torch.distributed.tensor.DTensor` can represent the split,
the mesh axes and placements (`Replicate()` or `Shard(d)`, this module's typed mirrors of DTensor's) that
reassemble the global tensor. `to_dtensors` makes them, without communication.

DTensor represents a tensor that every coordinate of its mesh holds, whole (`replicate`) or as one contiguous
chunk per coordinate of `torch.chunk` sizes along one dim (`shard(d)`). So, per axis:

- every coordinate holds the same part: `replicate`;
- every coordinate holds a different contiguous chunk along one dim, in coordinate order: `shard(d)`;
- only some coordinates hold the key, each the same part (an expert of its own, a pinned pipeline stage): the
  axis is left out, and the DTensor lives on the sub-mesh of the other axes;
- anything else (strided or interleaved selections, uneven splits that are not `torch.chunk`'s, replicated kv
  heads, two axes on one dim): the tensor stays local, and `reason` says why.

The spec is checked for every coordinate of the sub-mesh, from the whole-mesh owners, so every rank of a
DTensor's sub-mesh reaches the same placements. `shard_specs` is pure: no process group, no tensor data.

Example:
    >>> from ownership import Ruleset
    >>> from ownership.loading.entries import KeyEntry
    >>> from ownership.loading.plan import build_plan
    >>> ruleset = Ruleset.from_text('''
    ... name = "tp-demo"
    ... axes = ["ep", "tp"]
    ... default = "replicate"
    ... [[rule]]
    ... id = "expert"
    ... match = "experts.<expert>.w"
    ... layout = "out in"
    ... place = { expert = { over = "ep", size = 4 }, out = { over = "tp", strategy = "shard" } }
    ... ''')
    >>> bound = ruleset.bind(mesh="ep=2,tp=2")
    >>> entries = [KeyEntry("experts.3.w", "F32", (8, 4)), KeyEntry("norm", "F32", (4,))]
    >>> specs = shard_specs(build_plan(bound, entries, rank=3), bound=bound)
    >>> specs["experts.3.w"].axes, specs["experts.3.w"].placements, dict(specs["experts.3.w"].ids)
    (('tp',), (Shard(dim=0),), {'expert': (3,), 'out': (4, 5, 6, 7)})
    >>> specs["norm"].axes, [str(p) for p in specs["norm"].placements]
    (('ep', 'tp'), ['replicate', 'replicate'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from ownership.compile.bind import BoundRule, BoundRuleset
from ownership.loading.plan import Plan
from ownership.placement.mesh import Mesh
from ownership.placement.selection import Selection, run_length

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.placement_types import Placement as TorchPlacement

__all__ = ["Placement", "Replicate", "Shard", "ShardSpec", "shard_specs", "to_dtensors"]


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every coordinate of the axis holds the whole tensor (DTensor's `Replicate()`)."""

    def __str__(self) -> str:
        return "replicate"

    def to_torch(self) -> TorchPlacement:
        from torch.distributed.tensor import Replicate as TorchReplicate

        return TorchReplicate()


@dataclass(frozen=True, slots=True)
class Shard:
    """Each coordinate of the axis holds one `torch.chunk` chunk of dim `dim`, in coordinate order (DTensor's
    `Shard(dim)`)."""

    dim: int

    def __str__(self) -> str:
        return f"shard({self.dim})"

    def to_torch(self) -> TorchPlacement:
        from torch.distributed.tensor import Shard as TorchShard

        return TorchShard(self.dim)


Placement: TypeAlias = Replicate | Shard

# Per dim: (start, stop) of a contiguous selection, or None where the kept indices are not one block.
_Ranges = tuple[tuple[int, int] | None, ...]
_Candidate = tuple[tuple[str, ...], tuple[Placement, ...]]


@dataclass(frozen=True)
class ShardSpec:
    """One local tensor seen globally.

    `axes` and `placements` (one per axis, `Replicate()` or `Shard(d)`) describe the DTensor that holds it; both
    are empty when the tensor stays local, and `reason` then says why. `ids` holds the global ids of each placed
    index this rank holds: a captured expert id, or the ids of a layout dim that is partitioned or sharded.
    """

    key: str
    global_shape: tuple[int, ...]
    axes: tuple[str, ...] = ()
    placements: tuple[Placement, ...] = ()
    ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    reason: str | None = None

    @property
    def is_dtensor(self) -> bool:
        return bool(self.axes)


def shard_specs(plan: Plan, *, bound: BoundRuleset) -> dict[str, ShardSpec]:
    """The `ShardSpec` of every owned key of `plan`, by local key; `bound` must be the plan's ruleset and mesh.

    Keys whose shape is unknown (plans from key lists) stay local.
    """
    rules = {rule.id: rule for rule in bound.rules}
    mesh = bound.mesh
    specs: dict[str, ShardSpec] = {}
    for entry, decision in plan.owned_entries():
        local_key = decision.local_key or decision.key
        rule = rules.get(decision.rule)
        shape = entry.shape
        ids = _ids(rule, decision.captures, shape, plan.coords, entry.key) if rule is not None else {}
        if shape is None:
            specs[local_key] = ShardSpec(entry.key, (), ids=ids, reason="its shape is unknown")
            continue
        owners = {rank: d.selection for rank, d in bound.owners(entry.key, shape)}
        found = _placements(mesh, owners, shape, plan.rank)
        if isinstance(found, str):
            specs[local_key] = ShardSpec(entry.key, shape, ids=ids, reason=found)
        else:
            specs[local_key] = ShardSpec(entry.key, shape, axes=found[0], placements=found[1], ids=ids)
    return specs


def _ids(
    rule: BoundRule,
    captures: Mapping[str, int | str],
    shape: tuple[int, ...] | None,
    coords: Mapping[str, int],
    key: str,
) -> dict[str, tuple[int, ...]]:
    ids: dict[str, tuple[int, ...]] = {}
    for placement in rule.captures:
        value = captures.get(placement.name)
        if value is not None:
            ids[placement.name] = (int(value),)
    if rule.dims and shape is not None:
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(shape, key), strict=True):
            ids[dim.name] = tuple(strategy.owned(rule.mesh.coord(coords, dim.axis)))
    return ids


def _placements(
    mesh: Mesh, owners: Mapping[int, Selection], shape: tuple[int, ...], rank: int
) -> _Candidate | str:
    """(axes, placements) of the DTensor holding `rank`'s part, or why there is none."""
    ranges = {owner: _ranges(selection, shape) for owner, selection in owners.items()}
    found = _candidate(mesh, ranges, rank)
    if isinstance(found, str):
        return found
    axes, placements = found
    if not axes:
        return "no mesh axis holds it as one tensor: it is partitioned or pinned on every axis"
    by_axis = dict(zip(axes, placements, strict=True))
    sharded = [p for p in placements if isinstance(p, Shard)]
    if len(set(sharded)) != len(sharded):
        return "two mesh axes shard the same dim"
    coords = mesh.coords(rank)
    for member in _members(mesh, coords, axes):
        if _candidate(mesh, ranges, member) != found:
            return "the ranks of its sub-mesh hold it in different ways"
        if ranges.get(member) != _chunk_ranges(shape, mesh.coords(member), by_axis, mesh):
            return "its parts are not torch.chunk's contiguous chunks in coordinate order"
    return found


def _candidate(mesh: Mesh, ranges: Mapping[int, _Ranges], rank: int) -> _Candidate | str:
    """Per axis, from the coordinates that differ from `rank` only there: replicate, shard(d) or left out."""
    mine = ranges.get(rank)
    if mine is None:
        return "this rank does not own it"
    if any(dim is None for dim in mine):
        return "its selection is strided or not contiguous"
    coords = mesh.coords(rank)
    axes: list[str] = []
    placements: list[Placement] = []
    for axis, size in mesh.axes:
        line = [ranges.get(mesh.rank({**coords, axis: c})) for c in range(size)]
        held = [r for r in line if r is not None]
        if len(held) < size:
            if any(r != mine for r in held):
                return f"some coordinates of {axis} hold different parts of it and others none"
            continue
        if all(r == mine for r in held):
            axes.append(axis)
            placements.append(Replicate())
            continue
        differing = {d for r in held for d, (a, b) in enumerate(zip(r, mine, strict=True)) if a != b}
        if len(differing) != 1:
            return f"its parts along {axis} differ in more than one dim"
        axes.append(axis)
        placements.append(Shard(differing.pop()))
    return tuple(axes), tuple(placements)


def _members(mesh: Mesh, coords: Mapping[str, int], axes: Sequence[str]) -> list[int]:
    """Ranks of the sub-mesh over `axes` through `coords`."""
    members = [dict(coords)]
    for axis in axes:
        members = [{**c, axis: value} for c in members for value in range(mesh.size(axis))]
    return [mesh.rank(c) for c in members]


def _chunk_ranges(
    shape: tuple[int, ...], coords: Mapping[str, int], by_axis: Mapping[str, Placement], mesh: Mesh
) -> _Ranges:
    """The part DTensor gives `coords`: `torch.chunk` sizes (ceil(n/P), the last ones smaller) per shard axis."""
    out: list[tuple[int, int] | None] = [(0, size) for size in shape]
    for axis, placement in by_axis.items():
        if not isinstance(placement, Shard):
            continue
        d = placement.dim
        num = mesh.size(axis)
        chunk = -(-shape[d] // num)
        start = min(shape[d], chunk * coords[axis])
        out[d] = (start, min(shape[d], start + chunk))
    return tuple(out)


def _ranges(selection: Selection, shape: tuple[int, ...]) -> _Ranges:
    if selection is None:
        return tuple((0, size) for size in shape)
    out: list[tuple[int, int] | None] = []
    for dim, size in zip(selection, shape, strict=True):
        if dim is None:
            out.append((0, size))
        elif len(dim) == 1 and (dim[0][2] == 1 or run_length(dim[0]) == 1):
            start = dim[0][0]
            out.append((start, start + run_length(dim[0])))
        else:
            out.append(None)
    return tuple(out)


def to_dtensors(
    tensors: Mapping[str, torch.Tensor], *, shards: Mapping[str, ShardSpec], device_mesh: DeviceMesh
) -> dict[str, torch.Tensor]:
    """`tensors` with every one whose `ShardSpec` has axes made a `DTensor` on that sub-mesh of `device_mesh`.

    Local tensors must already be on the DeviceMesh's device type. No communication: `DTensor.from_local` with
    the spec's global shape and contiguous stride, `run_check=False`.
    """
    import torch
    from torch.distributed.tensor import DTensor

    submeshes: dict[tuple[str, ...], Any] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        spec = shards.get(key)
        if spec is None or not spec.is_dtensor:
            out[key] = tensor
            continue
        submesh = submeshes.get(spec.axes)
        if submesh is None:
            names = tuple(device_mesh.mesh_dim_names or ())
            submesh = device_mesh if spec.axes == names else device_mesh[spec.axes]
            submeshes[spec.axes] = submesh
        out[key] = DTensor.from_local(
            tensor,
            submesh,
            [placement.to_torch() for placement in spec.placements],
            run_check=False,
            shape=torch.Size(spec.global_shape),
            stride=_contiguous_stride(spec.global_shape),
        )
    return out


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * max(shape[d + 1], 1)
    return tuple(stride)
