"""`lint`: prove a ruleset against a checkpoint (or key list) and a mesh, from headers alone.

Stages, each run only when the one before leaves something to check: the rule file (schema, then one analysis
of every rule for the static checks), binding to the params and the mesh, then the keys and the whole mesh in
one pass. Bad input that stops linting altogether (a missing checkpoint, a mesh that does not parse) raises the
library's own errors instead.

Example:
    >>> report = lint("vllm-ep-lora", ["m.layers.0.mlp.experts.3.w1.lora_A.weight"], mesh="ep=2",
    ...               params={"num_experts": 4})
    >>> report.exit_code, sorted({f.check for f in report.findings})
    (0, ['variant-absent'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ownership.errors import MeshError, RulesetError
from ownership.lint.finding import Finding, LintReport
from ownership.lint.keys import check_keys
from ownership.lint.static import finding_of, static_findings
from ownership.loading.entries import Source, entries_from
from ownership.placement.mesh import MeshLike, to_mesh
from ownership.ruleset import Ruleset, detect_ruleset, family_ruleset, model_type_of
from ownership.spec.builtin import RuleSource, rule_source
from ownership.spec.extends import resolve_spec
from ownership.spec.params import merge_configs
from ownership.spec.program import check
from ownership.spec.schema import RulesetSpec, load_ruleset_spec, parse_ruleset

__all__ = ["lint"]


def lint(
    ruleset: str | os.PathLike[str] | RulesetSpec | Ruleset,
    source: Source | None = None,
    *,
    mesh: MeshLike,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    text: str | None = None,
    force_config: bool = False,
) -> LintReport:
    """Lint a ruleset (a `Ruleset`, a name, a path, `"auto"` for the built-in of the checkpoint's `model_type`,
    a parsed spec, or `text` of a rule file) against `source` and `mesh`.

    `source` is a checkpoint path or an open checkpoint, a list of keys or `(key, dtype, shape)`, entries, or
    None for the static checks and binding alone. `config` (a base model's config.json, say, for an adapter) is
    laid over the checkpoint's own config for params and for the adapter's rank (one of another `model_type`
    is an error unless `force_config`).
    """
    mesh_obj = to_mesh(mesh)
    entries, own_config = entries_from(source) if source is not None else (None, None)
    config = merge_configs(own_config, config, force=force_config)
    if isinstance(ruleset, str) and ruleset == "auto" and text is None:
        ruleset = detect_ruleset(config)
    loaded = _load(ruleset, text)
    report = LintReport(
        loaded.name,
        str(loaded.origin),
        str(mesh_obj),
        None if entries is None else len(entries),
        findings=loaded.findings,
        rule_file=None if loaded.origin.path is None else str(loaded.origin.path),
    )
    if loaded.ruleset is None or report.exit_code:
        return report
    try:
        bound = loaded.ruleset.bind(mesh=mesh_obj, params=params, config=config)
    except (RulesetError, MeshError) as error:
        report.findings.append(finding_of(error))
        return report
    right = family_ruleset(loaded.ruleset, config)
    if right is not None:
        report.add(
            "wrong-ruleset",
            f"ruleset {loaded.name!r} is not made for model_type {model_type_of(config)!r}; the built-in for it "
            f"is {right!r}",
            fix=f"lint with {right!r} (or `auto`, which picks it from the config)",
            data={"model_type": model_type_of(config), "ruleset": right},
        )
    if entries is not None:
        check_keys(bound, entries, report, config=config)
    return report


class _Loaded(NamedTuple):
    """A ruleset read for linting: its name and origin, the checked `Ruleset` (None when it did not check),
    and the findings so far."""

    name: str
    origin: RuleSource
    ruleset: Ruleset | None
    findings: list[Finding]


def _load(ruleset: str | os.PathLike[str] | RulesetSpec | Ruleset, text: str | None) -> _Loaded:
    if isinstance(ruleset, Ruleset):
        # Already analysed, without problems: the ruleset-wide checks only.
        return _Loaded(ruleset.name, ruleset.origin, ruleset, static_findings(ruleset.program, []))
    if isinstance(ruleset, RulesetSpec):
        origin, name = RuleSource("<spec>"), ruleset.name
    elif text is not None:
        origin, name = RuleSource(str(ruleset)), str(ruleset)
    else:
        # An unknown name is unusable input, raised; a rule file that does not check is a finding.
        origin, name = rule_source(ruleset), str(ruleset)
    try:
        if isinstance(ruleset, RulesetSpec):
            spec = ruleset
        elif text is not None:
            spec = parse_ruleset(text, source=str(origin))
        else:
            assert origin.path is not None
            spec = load_ruleset_spec(origin.path, source=str(origin))
        own = frozenset(rule.id for rule in spec.rules)
        base_dir = origin.path.parent if origin.path is not None else Path(".")
        merged, chain = resolve_spec(spec, source=str(origin), base_dir=base_dir)
    except RulesetError as error:
        return _Loaded(name, origin, None, [finding_of(error)])
    program, problems = check(merged, source=str(origin))
    checked = (
        None
        if program is None
        else Ruleset(spec=merged, origin=origin, program=program, extends=chain, own_rules=own)
    )
    return _Loaded(merged.name, origin, checked, static_findings(program, problems))
