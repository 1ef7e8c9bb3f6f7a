"""`lint`: prove a ruleset against a checkpoint (or key list) and a mesh, from headers alone.

Stages, each run only when the one before leaves something to check: the rule file (schema and static checks),
binding to the params and the mesh, then the keys and the whole mesh in one pass. Bad input that stops linting
altogether (a missing checkpoint, a mesh that does not parse) raises the library's own errors instead.

Example:
    >>> report = lint("vllm-ep-lora", ["m.layers.0.mlp.experts.3.w1.lora_A.weight"], mesh="ep=2",
    ...               params={"num_experts": 4})
    >>> report.exit_code, sorted({f.check for f in report.findings})
    (0, ['variant-absent'])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ownership.errors import RulesetError
from ownership.lint.finding import Finding, LintReport
from ownership.lint.keys import check_keys
from ownership.lint.static import static_findings
from ownership.plan import EntryLike, entries_from_keys
from ownership.ruleset import MeshLike, Ruleset, merge_configs, resolve_spec, rule_file, to_mesh
from ownership.spec import RulesetSpec, load_ruleset_spec, parse_ruleset

__all__ = ["lint"]


def lint(
    ruleset: str | os.PathLike[str] | RulesetSpec,
    source: str | os.PathLike[str] | Sequence[Any] | None = None,
    *,
    mesh: MeshLike,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    text: str | None = None,
) -> LintReport:
    """Lint a ruleset (name, path, parsed spec, or `text` of a rule file) against `source` and `mesh`.

    `source` is a checkpoint path, a list of keys or `(key, dtype, shape)`, entries, or None for the static
    checks and binding alone. `config` (a base model's config.json, say, for an adapter) is laid over the
    checkpoint's own config for params and for the adapter's rank.
    """
    mesh_obj = to_mesh(mesh)
    name, where, spec, finding = _load(ruleset, text)
    entries, own_config = _entries(source)
    config = merge_configs(own_config, config)
    report = LintReport(name, where, str(mesh_obj), None if entries is None else len(entries))
    if finding is not None or spec is None:
        if finding is not None:
            report.findings.append(finding)
        return report
    report.ruleset = spec.name
    report.findings.extend(static_findings(spec, source=where))
    if report.exit_code:
        return report
    try:
        bound = Ruleset.from_spec(spec, source=where).bind(mesh=mesh_obj, params=params, config=config)
    except RulesetError as error:
        report.findings.append(
            Finding(error.code or "ruleset", "error", error.message, rule=error.rule, fix=error.fix)
        )
        return report
    if entries is not None:
        check_keys(bound, entries, report, config=config)
    return report


def _load(
    ruleset: str | os.PathLike[str] | RulesetSpec, text: str | None
) -> tuple[str, str, RulesetSpec | None, Finding | None]:
    if isinstance(ruleset, RulesetSpec):
        try:
            return ruleset.name, "<spec>", resolve_spec(ruleset, source="<spec>")[0], None
        except RulesetError as error:
            return (
                ruleset.name,
                "<spec>",
                None,
                Finding(error.code or "schema", "error", error.message, rule=error.rule, fix=error.fix),
            )
    path, where = (Path("<string>"), str(ruleset)) if text is not None else rule_file(ruleset)
    try:
        spec = parse_ruleset(text, source=where) if text is not None else load_ruleset_spec(path)
        spec, _ = resolve_spec(spec, source=where, base_dir=path.parent)
    except RulesetError as error:
        return (
            str(ruleset),
            where,
            None,
            Finding(error.code or "schema", "error", error.message, rule=error.rule, fix=error.fix),
        )
    return spec.name, where, spec, None


def _entries(source: Any) -> tuple[list[EntryLike] | None, Mapping[str, Any] | None]:
    if source is None:
        return None, None
    if isinstance(source, (str, os.PathLike)):
        from ownership.formats import open_checkpoint

        with open_checkpoint(source) as checkpoint:
            return list(checkpoint.entries()), checkpoint.config
    items: list[Any] = list(source) if isinstance(source, Iterable) else []
    if items and not isinstance(items[0], (str, tuple, list)):
        return items, None
    return list(entries_from_keys(items)), None
