"""The `Ruleset` object: a checked rule file, and the entry points to compile and plan with it.

Example:
    >>> ruleset = load_ruleset("vllm-ep-lora")
    >>> rules = ruleset.compile(mesh="ep=4", rank=1, params={"num_experts": 10})
    >>> rules.decide("base_model.model.model.layers.0.mlp.experts.4.up_proj.lora_A.weight").owned
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ownership.builtin import builtin_path
from ownership.compile import BoundRuleset, RankRules, bind
from ownership.errors import MeshError
from ownership.mesh import Mesh
from ownership.params import resolve_params
from ownership.plan import EntryLike, MeshPlan, Plan, build_mesh_plan, build_plan, entries_from_keys
from ownership.rules import Program, analyze, param_users
from ownership.spec import RulesetSpec, load_ruleset_spec, parse_ruleset

__all__ = ["MeshLike", "Ruleset", "Source", "load_ruleset", "to_mesh"]

MeshLike = Mesh | str | Mapping[str, int]
Source = str | os.PathLike[str] | Sequence[str] | Sequence[tuple[str, str | None, Sequence[int] | None]]


def to_mesh(mesh: MeshLike) -> Mesh:
    """A `Mesh` from a Mesh, a string such as `pp=2,ep=4`, or a mapping of axis sizes."""
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, str):
        return Mesh.parse(mesh)
    if isinstance(mesh, Mapping):
        return Mesh.of(mesh)
    raise MeshError(f"cannot make a mesh from {mesh!r}", expected="a Mesh, 'ep=4' or {'ep': 4}")


@dataclass(frozen=True)
class Ruleset:
    """A checked ruleset: its spec, where it came from, and its rules joined into one pattern."""

    spec: RulesetSpec
    source: str
    program: Program

    @classmethod
    def from_spec(cls, spec: RulesetSpec, *, source: str = "<string>") -> Ruleset:
        return cls(spec=spec, source=source, program=analyze(spec, source=source))

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>") -> Ruleset:
        """Parse and check TOML text."""
        return cls.from_spec(parse_ruleset(text, source=source), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, source: str | None = None) -> Ruleset:
        """Parse and check a rule file; `source` is how messages name it (default: the path)."""
        spec = load_ruleset_spec(path)
        return cls(spec=spec, source=source or str(path), program=analyze(spec, source=source or str(path)))

    @property
    def name(self) -> str:
        return self.spec.name

    def resolve_params(
        self, params: Mapping[str, Any] | None = None, *, config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Every declared param's value from `params`, then `config`, then defaults."""
        return resolve_params(
            self.spec.params,
            given=dict(params or {}),
            config=config,
            source=self.source,
            users=param_users(self.spec),
        )

    def bind(
        self,
        *,
        mesh: MeshLike,
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> BoundRuleset:
        """Resolve params and bind every rule to the mesh: the whole-mesh view (`owners`)."""
        return bind(self.program, mesh=to_mesh(mesh), params=self.resolve_params(params, config=config))

    def compile(
        self,
        *,
        mesh: MeshLike,
        rank: int,
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> RankRules:
        """The decision function of one rank: `.decide(key, shape=None)`."""
        return self.bind(mesh=mesh, params=params, config=config).for_rank(rank)

    def plan(
        self,
        source: Source | Iterable[EntryLike],
        *,
        mesh: MeshLike,
        rank: int | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Plan | MeshPlan:
        """Decide every entry of `source` for `rank`, or for every rank when `rank` is None.

        `source` is a checkpoint path (file or folder; params such as `num_experts` are then also read from its
        config.json), a list of keys, a list of `(key, dtype, shape)`, or entries.
        """
        entries, config = _entries(source)
        bound = self.bind(mesh=mesh, params=params, config=config)
        if rank is None:
            return build_mesh_plan(bound, entries)
        return build_plan(bound, entries, rank=rank)


def _entries(source: Any) -> tuple[list[EntryLike], Mapping[str, Any] | None]:
    if isinstance(source, (str, os.PathLike)):
        from ownership.formats import open_checkpoint

        with open_checkpoint(source) as checkpoint:
            return list(checkpoint.entries()), checkpoint.config
    items = list(source)
    if items and not isinstance(items[0], (str, tuple, list)):
        return items, None
    return list(entries_from_keys(items)), None


def load_ruleset(name_or_path: str | os.PathLike[str]) -> Ruleset:
    """A built-in ruleset by name (`vllm-ep-lora`), or a rule file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or os.sep in str(name_or_path):
        return Ruleset.from_file(path)
    name = str(name_or_path)
    return Ruleset.from_file(builtin_path(name), source=f"{name}.toml (built-in)")
