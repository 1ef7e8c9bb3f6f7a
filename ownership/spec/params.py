"""Params: the model facts rules refer to, resolved from what the user gives, a config file, or defaults.

Precedence: an explicit value, then the first of the param's `config` keys found in `config.json` /
`adapter_config.json` (dotted keys reach into nested objects, e.g. `ffn_config.moe_num_experts`; a multimodal
model's text section, such as `text_config`, is read before the top level), then a value by the config's
`model_type` (`model_types`), then the declared default. A param with none of these is an error that names it,
the rules that use it and where it could come from, unless it is `optional` (a model size that only serves
checks). Params are never guessed from the checkpoint's keys.

Sizes in rules are an int, a param name, or a product of them (`num_heads*head_dim`).

Example:
    >>> from ownership.spec.schema import ParamSpec
    >>> declared = {"num_experts": ParamSpec(config=["num_experts", "num_local_experts"])}
    >>> resolve_params(declared, given={}, config={"num_local_experts": 8}, source="demo")
    {'num_experts': 8}
    >>> evaluate_size("num_experts*2", {"num_experts": 8}, rule="r", source="demo")
    16
    >>> evaluate_size("d_model/n_heads*kv_heads", {"d_model": 64, "n_heads": 8, "kv_heads": 2}, rule="r", source="d")
    16
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ownership.errors import CheckpointError, RulesetError
from ownership.spec.schema import ParamSpec

__all__ = [
    "TEXT_SECTIONS",
    "coerce_param",
    "config_lookup",
    "config_sections",
    "evaluate_size",
    "known_size",
    "merge_configs",
    "resolve_params",
    "size_names",
]


def coerce_param(text: str) -> Any:
    """Read a command-line param value: JSON (numbers, lists) where it parses, else the text itself; a number
    too long to read is a `RulesetError`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
    except (ValueError, RecursionError):
        raise RulesetError(
            "cannot read a param value",
            found=f"{text[:40]}... ({len(text):,} characters)" if len(text) > 40 else repr(text),
            expected="a number of up to 4,300 digits, a JSON list, or text",
            fix="check the value",
            code="bad-param",
        ) from None


def config_lookup(config: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted key of a nested mapping, or None."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


TEXT_SECTIONS = ("text_config", "language_config", "llm_config", "thinker_config.text_config")
"""Where multimodal configs keep their language model's config, looked up before the top level."""


def config_sections(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The language model's sections of a config (`text_config`, ...) that it has, then the config itself.

    Example:
        >>> [sorted(s) for s in config_sections({"text_config": {"hidden_size": 8}, "model_type": "vl"})]
        [['hidden_size'], ['model_type', 'text_config']]
    """
    nested = [config_lookup(config, name) for name in TEXT_SECTIONS]
    return [*(section for section in nested if isinstance(section, Mapping)), config]


def merge_configs(
    own: Mapping[str, Any] | None, given: Mapping[str, Any] | None, *, force: bool = False
) -> dict[str, Any] | None:
    """A checkpoint's own config with a given one (a base model's, for an adapter) laid over it; None when
    neither exists. A given config of another `model_type` than the checkpoint's own is a `CheckpointError`
    (it would silently decide the checkpoint as another model), unless `force`.

    Example:
        >>> merge_configs({"model_type": "gpt_oss", "num_local_experts": 32}, {"num_local_experts": 8})
        {'model_type': 'gpt_oss', 'num_local_experts': 8}
    """
    if own is None and given is None:
        return None
    ours, theirs = (own or {}).get("model_type"), (given or {}).get("model_type")
    if not force and isinstance(ours, str) and isinstance(theirs, str) and ours != theirs:
        raise CheckpointError(
            "the config given is of another model than the checkpoint",
            found=f"model_type {theirs!r} given, {ours!r} in the checkpoint's config.json",
            expected="the checkpoint's own model_type, or no model_type in the config given",
            fix="pass the checkpoint's base model's config (or --param for the values you mean); to decide it as "
            "the other model all the same, pass --force-config (force_config=True in Python)",
            code="config-mismatch",
        )
    return {**(own or {}), **(given or {})}


def resolve_params(
    declared: Mapping[str, ParamSpec],
    *,
    given: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    source: str,
    users: Mapping[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Every declared param's value; unknown given names and missing values are `RulesetError`s."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise RulesetError(
            f"unknown param {unknown[0]!r}",
            source=source,
            found=", ".join(unknown),
            expected=f"one of: {', '.join(sorted(declared)) or '(this ruleset takes no params)'}",
            fix="check the spelling against `ownership rules show`",
            code="unknown-param",
        )
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        value = given.get(name)
        if value is None and config is not None:
            value = _from_config(config, spec.config)
            if value is None and spec.model_types:
                value = _by_model_type(config, spec.model_types)
        if value is None:
            value = spec.default
        if value is None and spec.optional:
            values[name] = None
            continue
        if value is None:
            used_by = (users or {}).get(name, [])
            where = f" (used by rule {', '.join(repr(r) for r in used_by)})" if used_by else ""
            from_config = (
                f", or a config.json with one of: {', '.join(spec.config)} (an adapter's comes from its base "
                "model: --config)"
                if spec.config
                else ""
            )
            raise RulesetError(
                f"missing param {name!r}{where}",
                source=source,
                expected=spec.doc or "a value",
                fix=f"pass --param {name}=VALUE (params={{'{name}': ...}} in Python){from_config}",
                code="missing-param",
            )
        if spec.choices is not None and value not in spec.choices:
            raise RulesetError(
                f"param {name!r} has a value it does not allow",
                source=source,
                found=repr(value),
                expected=f"one of {spec.choices}",
                fix=f"pass --param {name}=VALUE with one of {', '.join(map(str, spec.choices))}",
                code="bad-param",
            )
        values[name] = value
    return values


def _from_config(config: Mapping[str, Any], keys: list[str]) -> Any:
    for section in config_sections(config):
        for dotted in keys:
            value = config_lookup(section, dotted)
            if value is not None:
                return value
    return None


def _by_model_type(config: Mapping[str, Any], values: Mapping[str, Any]) -> Any:
    """The value for the config's model_type: the top level's (a multimodal wrapper's), else its text section's."""
    for section in reversed(config_sections(config)):
        model_type = section.get("model_type")
        if isinstance(model_type, str) and model_type in values:
            return values[model_type]
    return None


_TOKEN = re.compile(r"\s*([*/]?)\s*([^*/\s]+)\s*")


def _terms(expr: str) -> list[tuple[str, str]]:
    """`a*b/c` -> [('*', 'a'), ('*', 'b'), ('/', 'c')]."""
    return [(op or "*", name) for op, name in _TOKEN.findall(expr)]


def size_names(expr: int | str) -> list[str]:
    """Param names a size expression refers to."""
    if isinstance(expr, int):
        return []
    return [name for _, name in _terms(expr) if not name.isdigit()]


def evaluate_size(expr: int | str, params: Mapping[str, Any], *, rule: str | None, source: str) -> int:
    """The value of a size: an int, a param name, or products and exact quotients such as
    `num_heads*head_dim` or `hidden_size/num_heads` (left to right)."""
    if isinstance(expr, int):
        return expr
    total = 1
    for op, token in _terms(expr):
        value: Any = int(token) if token.isdigit() else params.get(token)
        if not isinstance(value, int) or isinstance(value, bool) or (op == "/" and value == 0):
            raise RulesetError(
                f"size {expr!r} needs an integer param {token!r}",
                source=source,
                rule=rule,
                found=repr(value),
                expected="an integer" if op == "*" else "a non-zero integer",
                fix=f"pass --param {token}=N",
                code="bad-param",
            )
        if op == "/" and total % value:
            raise RulesetError(
                f"size {expr!r} does not divide exactly",
                source=source,
                rule=rule,
                found=f"{total} / {value}",
                expected="a whole quotient",
                fix="check the params behind the size against the model's config",
                code="bad-param",
            )
        total = total * value if op == "*" else total // value
    return total


def known_size(expr: int | str, params: Mapping[str, Any], *, rule: str | None, source: str) -> int | None:
    """`evaluate_size`, or None when a param it uses has no value (an optional param the config lacks).

    Example:
        >>> known_size("hidden_size", {"hidden_size": None}, rule=None, source="demo") is None
        True
    """
    if any(name in params and params[name] is None for name in size_names(expr)):
        return None
    return evaluate_size(expr, params, rule=rule, source=source)
