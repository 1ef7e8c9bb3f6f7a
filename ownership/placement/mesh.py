"""Meshes: ordered, named axes with sizes, and the flat order of ranks on them.

The flat rank order is row-major over the declared axis order: the last axis varies fastest. With vLLM's
`ep = dp x pcp x tp`, declaring the axes in that order gives vLLM's `ep_rank`. An axis a ruleset places on but
the mesh does not declare has size 1.

Example:
    >>> mesh = Mesh.parse("pp=2,ep=4")
    >>> mesh.num_ranks, mesh.coords(5)
    (8, {'pp': 1, 'ep': 1})
    >>> mesh.rank({"pp": 1, "ep": 1})
    5
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


@dataclass(frozen=True, slots=True)
class Mesh:
    """Named axes with sizes, in declared order."""

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.axes]
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
        """Parse `ep=4`, `pp=2,ep=4` or `pp=2 ep=4`."""
        axes: list[tuple[str, int]] = []
        for item in re.split(r"[,\s]+", text.strip()):
            if not item:
                continue
            name, sep, value = item.partition("=")
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
        return cls(tuple(axes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def num_ranks(self) -> int:
        total = 1
        for _, size in self.axes:
            total *= size
        return total

    def size(self, axis: str) -> int:
        """Size of an axis; 1 for an axis the mesh does not declare."""
        for name, size in self.axes:
            if name == axis:
                return size
        return 1

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

    def __str__(self) -> str:
        return ",".join(f"{name}={size}" for name, size in self.axes)


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
