"""Built-in rulesets: the TOML files under `rules/`, shipped inside the wheel as `ownership/_rules`.

Example:
    >>> "vllm-ep-lora" in builtin_names()
    True
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

from ownership.errors import RulesetError

__all__ = ["builtin_dir", "builtin_for_family", "builtin_names", "builtin_path", "families"]


def builtin_dir() -> Path:
    """The folder of built-in rule files: inside the installed package, or `rules/` of a source checkout."""
    packaged = Path(__file__).parent / "_rules"
    if packaged.is_dir():
        return packaged
    return Path(__file__).parent.parent / "rules"


def builtin_names() -> list[str]:
    """Names of the built-in rulesets (file stems)."""
    return sorted(p.stem for p in builtin_dir().glob("*.toml") if not p.stem.endswith(".cases"))


@lru_cache(maxsize=1)
def families() -> dict[str, str]:
    """`model_type` -> the built-in ruleset that lists it in `families` (a family is listed once)."""
    found: dict[str, str] = {}
    for name in builtin_names():
        data = tomllib.loads((builtin_dir() / f"{name}.toml").read_text(encoding="utf-8"))
        for family in data.get("families", []):
            found.setdefault(family, name)
    return found


def builtin_for_family(model_type: str) -> str | None:
    """The built-in ruleset for a `config.json` `model_type`, or None."""
    return families().get(model_type)


def builtin_path(name: str) -> Path:
    """The file of a built-in ruleset; an unknown name lists the known ones."""
    path = builtin_dir() / f"{name}.toml"
    if not path.is_file():
        raise RulesetError(
            f"no built-in ruleset {name!r}",
            found=repr(name),
            expected=f"one of {', '.join(builtin_names())}, a model_type ({', '.join(sorted(families()))}) "
            "or a path to a .toml file",
            fix="run `ownership rules list`, or pass a file path",
            code="unknown-ruleset",
        )
    return path
