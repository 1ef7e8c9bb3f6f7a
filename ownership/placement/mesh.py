"""Meshes: ordered, named axes with sizes, and the flat order of ranks on them.

The flat rank order is row-major over the declared axis order: the last axis varies fastest. With vLLM's
`ep = dp x pcp x tp`, declaring the axes in that order gives vLLM's `ep_rank`. An axis a ruleset places on but
the mesh does not declare has size 1.

An axis can also be a product of others, flattened row-major in the order given: `ep=dp*tp` declares an axis
`ep` of size dp x tp whose coordinate is `dp_rank * tp + tp_rank`, vLLM's expert-parallel group under
`--enable-expert-parallel` (experts spread over every rank of a pipeline stage, attention tensor-parallel within
each dp group). A placement may name such a product directly as well (`over = ["dp", "tp"]`, or `dp*tp`).

Example:
    >>> mesh = Mesh.parse("pp=2,ep=4")
    >>> mesh.num_ranks, mesh.coords(5)
    (8, {'pp': 1, 'ep': 1})
    >>> mesh.rank({"pp": 1, "ep": 1})
    5
    >>> vllm = Mesh.parse("dp=2,tp=4,ep=dp*tp")
    >>> vllm.num_ranks, vllm.size("ep"), vllm.coord(vllm.coords(6), "ep"), vllm.coord(vllm.coords(6), "tp")
    (8, 8, 6, 2)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from ownership import limits
from ownership.errors import MeshError

__all__ = ["REPLICATION_AXES", "Mesh", "MeshLike", "to_mesh"]

REPLICATION_AXES = ("dp", "pcp", "dcp", "cp")
"""Axes along which every rank holds the same weights (data and context parallelism): a mesh may declare them
whatever the ruleset places."""

_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True, repr=False)
class Mesh:
    """Named axes with sizes, in declared order."""

    axes: tuple[tuple[str, int], ...]
    derived: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Axes that are products of declared ones (`ep=dp*tp`), by name."""

    def __post_init__(self) -> None:
        names = [name for name, _ in self.axes]
        for name, parts in self.derived:
            if not _AXIS.match(name) or name in names:
                raise MeshError(
                    f"axis {name!r} is declared twice in {self}"
                    if name in names
                    else f"axis name {name!r} is not an identifier",
                    fix="give the product axis a name of its own, e.g. ep=dp*tp",
                )
            unknown = [p for p in parts if p not in names]
            if unknown or len(set(parts)) != len(parts) or not parts:
                raise MeshError(
                    f"axis {name!r} is a product of axes the mesh does not declare, or of one axis twice",
                    found="*".join(parts),
                    expected=f"a product of distinct axes among {', '.join(names)}",
                    fix=f"declare them first, e.g. {', '.join(f'{p}=2' for p in unknown or ['dp'])},{name}={'*'.join(parts)}",
                )
        for name, size in self.axes:
            if not _AXIS.match(name):
                raise MeshError(
                    f"axis name {name!r} is not an identifier", fix="use names such as ep, tp, pp"
                )
            if not isinstance(size, int) or size < 1:
                raise MeshError(
                    f"axis {name!r} has size {size!r}", expected="a positive integer", fix=f"write {name}=N"
                )
        if len(set(names)) != len(names):
            raise MeshError(f"axis declared twice in {self}", fix="declare each axis once")
        if self.num_ranks > limits.MAX_RANKS:
            raise limits.over_limit(
                f"the mesh {self}",
                name="MAX_RANKS",
                found=f"{self.num_ranks:,} ranks",
                error=MeshError,
                fix="check the axis sizes",
            )

    @classmethod
    def of(cls, axes: Mapping[str, int] | None = None, /, **sizes: int) -> Mesh:
        """A mesh from a mapping or keywords, in the given order: `Mesh.of(pp=2, ep=4)`."""
        items = dict(axes or {})
        items.update(sizes)
        return cls(tuple(items.items()))

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """Parse `ep=4`, `pp=2,ep=4` or `pp=2 ep=4`; `ep=dp*tp` declares a product axis."""
        axes: list[tuple[str, int]] = []
        derived: list[tuple[str, tuple[str, ...]]] = []
        for item in re.split(r"[,\s]+", text.strip()):
            if not item:
                continue
            name, sep, value = item.partition("=")
            if sep and "*" in value:
                derived.append((name.strip(), tuple(part.strip() for part in value.split("*"))))
                continue
            if sep and value.strip().isdigit() and len(value.strip()) > 18:
                # Past every limit, and int() refuses more than 4,300 digits.
                raise limits.over_limit(
                    f"axis {name.strip()!r} of the mesh",
                    name="MAX_RANKS",
                    found=f"a size of {len(value.strip()):,} digits",
                    error=MeshError,
                    fix="check the axis sizes",
                )
            if not sep or not value.strip().isdigit():
                raise MeshError(
                    f"cannot read mesh axis {item!r} in {text!r}",
                    expected="NAME=SIZE items separated by commas, e.g. pp=2,ep=4",
                    fix="write each axis as name=size",
                )
            axes.append((name.strip(), int(value)))
        if not axes:
            raise MeshError(f"empty mesh {text!r}", fix="give at least one axis, e.g. ep=4")
        return cls(tuple(axes), tuple(derived))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def num_ranks(self) -> int:
        total = 1
        for _, size in self.axes:
            total *= size
        return total

    def components(self, axis: str) -> tuple[str, ...]:
        """The declared axes an axis is made of: itself, a product axis's parts (`ep=dp*tp`, or `dp*tp` named
        directly), or none for an axis the mesh does not declare (size 1)."""
        for name, parts in self.derived:
            if name == axis:
                return parts
        parts = tuple(axis.split("*")) if "*" in axis else (axis,)
        return tuple(part for part in parts if part in self.names)

    def size(self, axis: str) -> int:
        """Size of an axis (a product axis: the product of its parts); 1 for an axis the mesh does not declare."""
        total = 1
        sizes = dict(self.axes)
        for part in self.components(axis):
            total *= sizes[part]
        return total

    def coord(self, coords: Mapping[str, int], axis: str) -> int:
        """A rank's coordinate on an axis, from its coordinates on the declared ones (row-major over a product
        axis's parts, the last fastest)."""
        sizes = dict(self.axes)
        value = 0
        for part in self.components(axis):
            value = value * sizes[part] + coords.get(part, 0)
        return value

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of a flat rank."""
        if not 0 <= rank < self.num_ranks:
            raise MeshError(
                f"rank {rank} is outside the mesh {self}",
                expected=f"0..{self.num_ranks - 1}",
                fix="pass a rank below the product of the axis sizes",
            )
        coords: dict[str, int] = {}
        for name, size in reversed(self.axes):
            rank, coords[name] = divmod(rank, size)
        return {name: coords[name] for name in self.names}

    def rank(self, coords: Mapping[str, int]) -> int:
        """Flat rank of full coordinates (axes the mesh does not declare must be 0 or absent)."""
        for name, value in coords.items():
            if value != 0 and name not in self.names:
                raise MeshError(
                    f"coordinate {name}={value} is on an axis the mesh {self} does not declare",
                    expected="0 or absent",
                    fix=f"declare {name} in the mesh",
                )
        rank = 0
        for name, size in self.axes:
            value = coords.get(name, 0)
            if not 0 <= value < size:
                raise MeshError(
                    f"coordinate {name}={value} is outside the mesh {self}", expected=f"0..{size - 1}"
                )
            rank = rank * size + value
        return rank

    def ranks(self) -> Iterator[int]:
        return iter(range(self.num_ranks))

    def __repr__(self) -> str:
        derived = f", derived={self.derived!r}" if self.derived else ""
        return f"Mesh(axes={self.axes!r}{derived})"

    def __str__(self) -> str:
        return ",".join(
            [f"{name}={size}" for name, size in self.axes]
            + [f"{name}={'*'.join(parts)}" for name, parts in self.derived]
        )


MeshLike: TypeAlias = Mesh | str | Mapping[str, int]
"""What every entry point takes as a mesh: a `Mesh`, its text (`pp=2,ep=4`) or a mapping of axis sizes."""


def to_mesh(mesh: MeshLike) -> Mesh:
    """A `Mesh` from a Mesh, a string such as `pp=2,ep=4`, or a mapping of axis sizes.

    Example:
        >>> to_mesh({"ep": 4}) == to_mesh("ep=4")
        True
    """
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, str):
        return Mesh.parse(mesh)
    if isinstance(mesh, Mapping):
        return Mesh.of(mesh)
    raise MeshError(f"cannot make a mesh from {mesh!r}", expected="a Mesh, 'ep=4' or {'ep': 4}")
