"""Who owns what, as pure arithmetic: meshes, placement strategies and their inverses, selections, decisions.

No rules and no I/O: this layer knows axes, coordinates, index spaces and element runs.

Example:
    >>> from ownership.placement import Mesh, make_strategy
    >>> Mesh.parse("ep=4").coords(2), list(make_strategy("round_robin", num_ids=10, num_coords=4).owned(2))
    ({'ep': 2}, [2, 6])
"""

from __future__ import annotations

from ownership.placement.decision import Decision
from ownership.placement.mesh import Mesh, MeshLike, to_mesh
from ownership.placement.selection import DimSelection, Run, Selection
from ownership.placement.strategy import Strategy, make_strategy

__all__ = [
    "Decision",
    "DimSelection",
    "Mesh",
    "MeshLike",
    "Run",
    "Selection",
    "Strategy",
    "make_strategy",
    "to_mesh",
]
