"""The `Ruleset` object: a checked rule file, and the entry points to compile and plan with it.

Example:
    >>> ruleset = load_ruleset("vllm-ep-lora")
    >>> rules = ruleset.compile(mesh="ep=4", rank=1, params={"num_experts": 10})
    >>> rules.decide("base_model.model.model.layers.0.mlp.experts.4.up_proj.lora_A.weight").owned
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ownership.builtin import builtin_for_family, builtin_names, builtin_path
from ownership.compile import BoundRuleset, RankRules, bind
from ownership.compose import resolve
from ownership.errors import MeshError, RulesetError
from ownership.mesh import Mesh
from ownership.params import resolve_params
from ownership.plan import EntryLike, MeshPlan, Plan, build_mesh_plan, build_plan, entries_from_keys
from ownership.rules import Program, analyze, param_users
from ownership.spec import RulesetSpec, load_ruleset_spec, parse_ruleset

__all__ = [
    "MeshLike",
    "Ruleset",
    "Source",
    "detect_ruleset",
    "load_ruleset",
    "merge_configs",
    "resolve_spec",
    "rule_file",
    "to_mesh",
]

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
    """The spec with everything it extends merged in."""
    source: str
    program: Program
    extends: tuple[str, ...] = ()
    """The sources of the rulesets it extends, nearest first."""
    own_rules: frozenset[str] = frozenset()
    """Ids of the rules its own file writes (new or overriding); the others are inherited."""
    _bound: dict[str, BoundRuleset] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_spec(
        cls, spec: RulesetSpec, *, source: str = "<string>", base_dir: str | os.PathLike[str] = "."
    ) -> Ruleset:
        """Check a parsed spec; an `extends` path is looked up relative to `base_dir`."""
        own = frozenset(rule.id for rule in spec.rules)
        spec, chain = resolve_spec(spec, source=source, base_dir=base_dir)
        return cls(
            spec=spec, source=source, program=analyze(spec, source=source), extends=chain, own_rules=own
        )

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>") -> Ruleset:
        """Parse and check TOML text."""
        return cls.from_spec(parse_ruleset(text, source=source), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, source: str | None = None) -> Ruleset:
        """Parse and check a rule file; `source` is how messages name it (default: the path)."""
        path = Path(path)
        return cls.from_spec(load_ruleset_spec(path), source=source or str(path), base_dir=path.parent)

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
        """Resolve params and bind every rule to the mesh: the whole-mesh view (`owners`).

        Binding is pure, so the result is kept per mesh and resolved params: loading rank after rank in one
        process binds once.
        """
        mesh_obj = to_mesh(mesh)
        resolved = self.resolve_params(params, config=config)
        cache_key = json.dumps([mesh_obj.axes, sorted(resolved.items())], default=str)
        bound = self._bound.get(cache_key)
        if bound is None:
            bound = self._bound[cache_key] = bind(self.program, mesh=mesh_obj, params=resolved)
        return bound

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
        config: Mapping[str, Any] | None = None,
    ) -> Plan | MeshPlan:
        """Decide every entry of `source` for `rank`, or for every rank when `rank` is None.

        `source` is a checkpoint path (file or folder; params such as `num_experts` are then also read from its
        config.json), a list of keys, a list of `(key, dtype, shape)`, or entries. `config` (for an adapter, its
        base model's config.json) is laid over the checkpoint's own.
        """
        entries, own_config = _entries(source)
        bound = self.bind(mesh=mesh, params=params, config=merge_configs(own_config, config))
        if rank is None:
            return build_mesh_plan(bound, entries)
        return build_plan(bound, entries, rank=rank)


def merge_configs(own: Mapping[str, Any] | None, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's own config with a given one laid over it (None when neither exists)."""
    if own is None and given is None:
        return None
    return {**(own or {}), **(given or {})}


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
    """A built-in ruleset by name (`vllm-ep-lora`) or by a `model_type` it serves (`qwen3_moe`), or a rule file.

    Example:
        >>> load_ruleset("mixtral").name
        'transformers-moe'
    """
    path, source = rule_file(name_or_path)
    return Ruleset.from_file(path, source=source)


def detect_ruleset(config: Mapping[str, Any] | None, *, source: str = "the checkpoint") -> Ruleset:
    """The built-in ruleset for a checkpoint's `config.json` `model_type`; a clear error when there is none."""
    model_type = (config or {}).get("model_type")
    name = builtin_for_family(model_type) if isinstance(model_type, str) else None
    if name is None:
        raise RulesetError(
            "cannot pick a ruleset for this checkpoint",
            source=source,
            found=f"model_type {model_type!r}" if model_type else "no config.json with a model_type",
            expected="a model_type that a built-in ruleset lists (`ownership rules list`)",
            fix="name a ruleset (a built-in or a .toml file), or pass --config with the base model's config.json",
            code="unknown-ruleset",
        )
    return load_ruleset(name)


def resolve_spec(
    spec: RulesetSpec, *, source: str, base_dir: str | os.PathLike[str] = "."
) -> tuple[RulesetSpec, tuple[str, ...]]:
    """Merge what `spec` extends (built-in names, or paths relative to `base_dir`); see `ownership.compose`."""
    return resolve(spec, source=source, find=_finder(Path(base_dir)))


def rule_file(name_or_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """The rule file of a path, a built-in name or a `model_type`, and how messages name it."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists() or os.sep in str(name_or_path):
        return path, str(path)
    name = str(name_or_path)
    if name not in builtin_names():
        name = builtin_for_family(name) or name
    return builtin_path(name), f"{name}.toml (built-in)"


def _finder(base_dir: Path) -> Callable[[str, str], tuple[RulesetSpec, str]]:
    def find(name: str, child_source: str) -> tuple[RulesetSpec, str]:
        if name.endswith(".toml") or "/" in name:
            path = base_dir / name
            return load_ruleset_spec(path), str(path)
        return load_ruleset_spec(builtin_path(name)), f"{name}.toml (built-in)"

    return find
