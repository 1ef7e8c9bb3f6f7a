"""The `Ruleset` facade: a checked rule file, and the verbs that use it (bind, compile, explain, plan).

It joins the rule language (`ownership.spec`) and the compiler (`ownership.compile`): a ruleset is loaded from a
built-in name, a `model_type` or a file, its `extends` chain merged, every rule analysed once, and bindings to a
mesh and params kept per (mesh, params), so loading rank after rank in one process binds once.

Example:
    >>> ruleset = load_ruleset("vllm-ep-lora")
    >>> rules = ruleset.compile(mesh="ep=4", rank=1, params={"num_experts": 10})
    >>> rules.decide("base_model.model.model.layers.0.mlp.experts.4.up_proj.lora_A.weight").owned
    True
    >>> ruleset.explain("m.layers.0.mlp.experts.4.w1.lora_A.weight", mesh="ep=4", params={"num_experts": 10}).ranks
    [1]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ownership.compile.bind import BoundRuleset, bind
from ownership.compile.rank import RankRules
from ownership.errors import RulesetError
from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.mesh import Mesh, MeshLike, to_mesh
from ownership.spec.builtin import RuleSource, builtin_for_family, rule_source
from ownership.spec.extends import resolve_spec
from ownership.spec.params import config_sections, resolve_params
from ownership.spec.program import Program, analyze, param_users
from ownership.spec.quant import quantization_config, select_family
from ownership.spec.schema import RulesetSpec, load_ruleset_spec, parse_ruleset

if TYPE_CHECKING:
    from ownership.loading.plan import MeshPlan, Plan

__all__ = [
    "Explanation",
    "Ruleset",
    "RulesetLike",
    "detect_ruleset",
    "family_ruleset",
    "load_ruleset",
    "model_type_of",
    "resolve_ruleset",
]


@dataclass(frozen=True)
class Ruleset:
    """A checked ruleset: its spec, where it came from, and its rules joined into one pattern."""

    spec: RulesetSpec
    """The spec with everything it extends merged in."""
    origin: RuleSource
    program: Program
    extends: tuple[RuleSource, ...] = ()
    """The rulesets it extends, nearest first."""
    own_rules: frozenset[str] = frozenset()
    """Ids of the rules its own file writes (new or overriding); the others are inherited."""
    _bound: dict[str, BoundRuleset] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_spec(
        cls,
        spec: RulesetSpec,
        *,
        source: str | RuleSource = "<string>",
        base_dir: str | os.PathLike[str] = ".",
    ) -> Ruleset:
        """Check a parsed spec; an `extends` path is looked up relative to `base_dir`."""
        origin = source if isinstance(source, RuleSource) else RuleSource(source)
        own = frozenset(rule.id for rule in spec.rules)
        merged, chain = resolve_spec(spec, source=str(origin), base_dir=base_dir)
        program = analyze(merged, source=str(origin))
        return cls(spec=merged, origin=origin, program=program, extends=chain, own_rules=own)

    @classmethod
    def from_text(cls, text: str, *, source: str = "<string>") -> Ruleset:
        """Parse and check TOML text."""
        return cls.from_spec(parse_ruleset(text, source=source), source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, source: str | RuleSource | None = None) -> Ruleset:
        """Parse and check a rule file; `source` says where it came from (default: the path)."""
        path = Path(path)
        origin = source if isinstance(source, RuleSource) else RuleSource(source or str(path), path)
        spec = load_ruleset_spec(path, source=str(origin))
        return cls.from_spec(spec, source=origin, base_dir=path.parent)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        """How messages name the ruleset: `NAME.toml (built-in)`, its path, or its label."""
        return str(self.origin)

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
        family = select_family(quantization_config(config), source=str(self.origin))
        cache_key = json.dumps(
            [mesh_obj.axes, sorted(resolved.items()), None if family is None else repr(family)], default=str
        )
        bound = self._bound.get(cache_key)
        if bound is None:
            bound = self._bound[cache_key] = bind(self.program, mesh=mesh_obj, params=resolved, family=family)
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

    def explain(
        self,
        key: str,
        *,
        mesh: MeshLike,
        shape: Sequence[int] | None = None,
        rank: int | None = None,
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Which rule decides `key`, with which captures, and what each owning rank (or only `rank`) holds of it.

        `shape` is needed by rules that select part of a tensor (a layout).
        """
        bound = self.bind(mesh=mesh, params=params, config=config)
        shape_t = None if shape is None else tuple(shape)
        owners = bound.owners(key, shape_t)
        if rank is not None:
            bound.mesh.coords(rank)  # a rank outside the mesh is an error
            owners = [(r, d) for r, d in owners if r == rank]
        found = bound.classify(key)
        return Explanation(
            key=key,
            shape=shape_t,
            rule=DEFAULT_RULE if found is None else found[0].id,
            default=self.spec.default,
            captures={} if found is None else found[0].rule.captures(found[1]),
            mesh=bound.mesh,
            owners=owners,
        )

    def plan(
        self,
        source: Any,
        *,
        mesh: MeshLike,
        rank: int | None = None,
        params: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Plan | MeshPlan:
        """`ownership.plan(self, source, ...)`: decide every entry of `source` for `rank`, or for every rank when
        `rank` is None (see `ownership.loading.plan.plan` for the sources it takes)."""
        # The one call from this layer into the loading layer above it: the method users expect on a ruleset.
        from ownership.loading.plan import plan

        return plan(self, source, mesh=mesh, rank=rank, params=params, config=config)


@dataclass(frozen=True)
class Explanation:
    """What `Ruleset.explain` found for one key: the rule, its captures, and each owner's decision."""

    key: str
    shape: tuple[int, ...] | None
    rule: str
    """The id of the rule that decides the key, or `<default>`."""
    default: str
    """The ruleset's default, which decides keys no rule matches."""
    captures: dict[str, int | str]
    mesh: Mesh
    owners: list[tuple[int, Decision]]

    @property
    def ranks(self) -> list[int]:
        return [rank for rank, _ in self.owners]

    def to_json(self) -> dict[str, Any]:
        """The JSON form `ownership explain --format json` prints (docs/plan-json.md)."""
        return {
            "key": self.key,
            "shape": None if self.shape is None else list(self.shape),
            "rule": self.rule,
            "default": self.default,
            "captures": self.captures,
            "mesh": dict(self.mesh.axes),
            "owners": [
                {"rank": rank, "coords": self.mesh.coords(rank), **decision.to_json()}
                for rank, decision in self.owners
            ],
        }


def load_ruleset(name_or_path: str | os.PathLike[str] | Ruleset) -> Ruleset:
    """A built-in ruleset by name (`vllm-ep-lora`) or by a `model_type` it serves (`qwen3_moe`), or a rule file;
    a `Ruleset` is returned as it is.

    Example:
        >>> load_ruleset("mixtral").name
        'transformers-moe'
    """
    if isinstance(name_or_path, Ruleset):
        return name_or_path
    origin = rule_source(name_or_path)
    assert origin.path is not None
    return Ruleset.from_file(origin.path, source=origin)


RulesetLike = Union["Ruleset", str, os.PathLike[str]]
"""What every entry point takes as a ruleset: a `Ruleset`, a built-in name, a `model_type`, a rule file, or
`"auto"` (the built-in for the checkpoint's `model_type`)."""


def resolve_ruleset(
    ruleset: RulesetLike, config: Mapping[str, Any] | None, *, source: str = "the checkpoint"
) -> Ruleset:
    """The `Ruleset` a caller means: `"auto"` picks the built-in for `config`'s `model_type` (`detect_ruleset`),
    anything else is `load_ruleset`'s."""
    if isinstance(ruleset, str) and ruleset == "auto":
        return detect_ruleset(config, source=source)
    return load_ruleset(ruleset)


def model_type_of(config: Mapping[str, Any] | None) -> str | None:
    """A config's `model_type`: the top level's (a multimodal wrapper's), else its text section's."""
    for section in reversed(config_sections(config or {})):
        model_type = section.get("model_type")
        if isinstance(model_type, str):
            return model_type
    return None


def family_ruleset(ruleset: Ruleset, config: Mapping[str, Any] | None) -> str | None:
    """The built-in that serves `config`'s `model_type` when `ruleset`, a built-in made for other families, does
    not (`transformers-moe` named for a GPT-OSS checkpoint: `gpt-oss`); None when it fits, is a file of the
    user's own, or is made for any family.

    Example:
        >>> family_ruleset(load_ruleset("transformers-moe"), {"model_type": "gpt_oss"})
        'gpt-oss'
        >>> family_ruleset(load_ruleset("gpt-oss"), {"model_type": "gpt_oss"}) is None
        True
    """
    model_type = model_type_of(config)
    if ruleset.origin.builtin is None or not ruleset.spec.families or model_type is None:
        return None
    if model_type in ruleset.spec.families:
        return None
    right = builtin_for_family(model_type)
    return right if right is not None and right != ruleset.name else None


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
