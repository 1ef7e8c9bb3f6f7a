"""The rule language: rule files to a checked program, with no mesh and no torch.

`schema` (the pydantic models, TOML and JSON Schema), `builtin` (where rulesets come from), `extends`
(composition), `params` (model facts from `--param` and config files), `template` (key templates to regexes),
`layout` (tensor dims in einops notation) and `program` (the analysed rules and the one `classify(key)`).

Example:
    >>> from ownership.spec import analyze, parse_ruleset
    >>> program = analyze(parse_ruleset('name = "x"\\n[[rule]]\\nid = "all"\\nmatch = "**"\\n'))
    >>> program.classify("model.norm.weight").rule.id
    'all'
"""

from __future__ import annotations

from ownership.spec.builtin import RuleSource, builtin_names, rule_source
from ownership.spec.program import Program, analyze, check
from ownership.spec.schema import (
    ParamSpec,
    PlacementSpec,
    RulesetSpec,
    RuleSpec,
    load_ruleset_spec,
    parse_ruleset,
    ruleset_json_schema,
)

__all__ = [
    "ParamSpec",
    "PlacementSpec",
    "Program",
    "RuleSource",
    "RuleSpec",
    "RulesetSpec",
    "analyze",
    "builtin_names",
    "check",
    "load_ruleset_spec",
    "parse_ruleset",
    "rule_source",
    "ruleset_json_schema",
]
