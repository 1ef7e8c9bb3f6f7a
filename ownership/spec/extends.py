"""Ruleset composition: a ruleset that `extends` another inherits its axes, params, index placements and rules.

Merging is plain data work on specs, before any rule is analysed:

- axes: the parent's, then any new ones of the child;
- params and index placements (`[place]`): the parent's, with the child's replacing those of the same name;
- `default`: the child's when it sets one, else the parent's;
- rules: the child's new rules first (first match wins, so they specialise), then the parent's in order, where a
  child rule with `overrides = "<id>"` takes the place of the inherited rule `<id>`. A child rule that reuses an
  inherited id without `overrides`, or overrides an id that does not exist, is an error naming both rulesets.

Example:
    >>> from ownership.spec.schema import parse_ruleset
    >>> base = parse_ruleset('''
    ... name = "base"
    ... axes = ["tp"]
    ... [[rule]]
    ... id = "attention"
    ... match = "**.attn.*"
    ... [[rule]]
    ... id = "rest"
    ... match = "**"
    ... ''')
    >>> child = parse_ruleset('''
    ... name = "child"
    ... extends = "base"
    ... [[rule]]
    ... id = "fused-attention"
    ... overrides = "attention"
    ... match = "**.attn.qkv"
    ... [[rule]]
    ... id = "sinks"
    ... match = "**.sinks"
    ... ''')
    >>> [r.id for r in merge(base, child, parent_source="base.toml", source="child.toml").rules]
    ['sinks', 'fused-attention', 'rest']

`resolve_spec(spec, source=..., base_dir=...)` merges the whole chain, finding parents among the built-ins or
by paths relative to the child's folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ownership.errors import RulesetError
from ownership.spec.builtin import RuleSource
from ownership.spec.schema import RulesetSpec, RuleSpec, load_ruleset_spec

__all__ = ["Finder", "merge", "resolve", "resolve_spec"]

Finder = Callable[[str], tuple[RulesetSpec, RuleSource]]
"""`find(name)` -> (the parent's spec, as written, and where it came from)."""


def resolve_spec(
    spec: RulesetSpec, *, source: str, base_dir: str | os.PathLike[str] = "."
) -> tuple[RulesetSpec, tuple[RuleSource, ...]]:
    """`resolve` with parents found among the built-ins, or by paths relative to `base_dir`."""
    return resolve(spec, source=source, find=_finder(Path(base_dir)))


def _finder(base_dir: Path) -> Finder:
    def find(name: str) -> tuple[RulesetSpec, RuleSource]:
        origin = (
            RuleSource.of_file(base_dir / name)
            if name.endswith(".toml") or "/" in name
            else RuleSource.of_builtin(name)
        )
        assert origin.path is not None
        return load_ruleset_spec(origin.path, source=str(origin)), origin

    return find


def resolve(
    spec: RulesetSpec, *, source: str, find: Finder, _chain: tuple[str, ...] = ()
) -> tuple[RulesetSpec, tuple[RuleSource, ...]]:
    """The spec with its whole `extends` chain merged in, and the chain's sources (nearest parent first).

    The merged spec no longer `extends` anything. A cycle is a `RulesetError`.
    """
    if spec.extends is None:
        return spec, ()
    if spec.name in _chain:
        raise RulesetError(
            "rulesets extend each other in a cycle",
            source=source,
            found=" -> ".join((*_chain, spec.name)),
            expected="a chain that ends in a ruleset without `extends`",
            fix="remove one `extends`",
            code="extends-cycle",
        )
    parent, origin = find(spec.extends)
    parent, above = resolve(parent, source=str(origin), find=find, _chain=(*_chain, spec.name))
    return merge(parent, spec, parent_source=str(origin), source=source), (origin, *above)


def merge(parent: RulesetSpec, child: RulesetSpec, *, parent_source: str, source: str) -> RulesetSpec:
    """`child` laid over an already resolved `parent` (see the module docstring for the rules)."""
    inherited = {rule.id: i for i, rule in enumerate(parent.rules)}
    replaced: dict[int, RuleSpec] = {}
    new: list[RuleSpec] = []
    for rule in child.rules:
        if rule.overrides is not None:
            if rule.overrides not in inherited:
                raise RulesetError(
                    f"rule overrides {rule.overrides!r}, which {parent.name!r} does not have",
                    source=source,
                    rule=rule.id,
                    found=repr(rule.overrides),
                    expected=f"one of the inherited rule ids {list(inherited)}",
                    fix=f"correct the id, or remove `overrides` to add a new rule (see {parent_source})",
                    code="bad-override",
                )
            replaced[inherited[rule.overrides]] = rule
        elif rule.id in inherited:
            raise RulesetError(
                f"rule id {rule.id!r} is already a rule of the extended ruleset {parent.name!r}",
                source=source,
                rule=rule.id,
                expected="a new id, or `overrides` to replace the inherited rule",
                fix=f'add overrides = "{rule.id}" to replace it in place, or give this rule another id',
                code="duplicate-rule-id",
            )
        else:
            new.append(rule)
    rules = new + [replaced.get(i, rule) for i, rule in enumerate(parent.rules)]
    fields = child.model_fields_set
    return RulesetSpec(
        name=child.name,
        summary=child.summary if "summary" in fields else parent.summary,
        families=child.families,
        axes=[*parent.axes, *(a for a in child.axes if a not in parent.axes)],
        params={**parent.params, **child.params},
        place={**parent.place, **child.place},
        replicated_axes=[
            *parent.replicated_axes,
            *(a for a in child.replicated_axes if a not in parent.replicated_axes),
        ],
        dims={**parent.dims, **child.dims},
        fragments={**parent.fragments, **child.fragments},
        default=child.default if "default" in fields else parent.default,
        rule=rules,
    )
