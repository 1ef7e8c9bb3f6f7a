"""Params: the model facts rules refer to, resolved from what the user gives, a config file, or defaults.

Precedence: an explicit value, then the first of the param's `config` keys found in `config.json` /
`adapter_config.json` (dotted keys reach into nested objects, e.g. `ffn_config.moe_num_experts`), then the
declared default. A param with none of these is an error that names it, the rules that use it and where it could
come from. Params are never guessed from the checkpoint's keys.

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

from ownership.errors import RulesetError
from ownership.spec.schema import ParamSpec

__all__ = [
    "coerce_param",
    "config_lookup",
    "evaluate_size",
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


def merge_configs(own: Mapping[str, Any] | None, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A checkpoint's own config with a given one (a base model's, for an adapter) laid over it; None when
    neither exists."""
    if own is None and given is None:
        return None
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
            for dotted in spec.config:
                value = config_lookup(config, dotted)
                if value is not None:
                    break
        if value is None:
            value = spec.default
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
