"""Where rulesets come from: the built-in TOML files under `rules/` (shipped inside the wheel as
`ownership/_rules`), rule files by path, and a `RuleSource` value that says which, for messages and for finding
a ruleset's case file.

A name is a built-in unless it looks like a path (ends in `.toml`, exists, or holds a path separator); a
`config.json` `model_type` names the built-in that lists it in `families`.

Example:
    >>> "vllm-ep-lora" in builtin_names()
    True
    >>> source = rule_source("mixtral")
    >>> source.builtin, str(source), source.cases_path().name
    ('transformers-moe', 'transformers-moe.toml (built-in)', 'transformers-moe.cases.toml')
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ownership.errors import RulesetError, did_you_mean, one_of

__all__ = [
    "RuleSource",
    "builtin_dir",
    "builtin_for_family",
    "builtin_names",
    "builtin_path",
    "families",
    "rule_source",
]


@dataclass(frozen=True, slots=True)
class RuleSource:
    """Where a ruleset came from: a built-in (by name), a file (by path), or text (by a label).

    `str(source)` is how messages name it: `NAME.toml (built-in)`, the path, or the label.
    """

    label: str
    path: Path | None = None
    builtin: str | None = None

    @classmethod
    def of_builtin(cls, name: str) -> RuleSource:
        return cls(f"{name}.toml (built-in)", builtin_path(name), name)

    @classmethod
    def of_file(cls, path: str | os.PathLike[str]) -> RuleSource:
        return cls(str(path), Path(path))

    @property
    def name(self) -> str:
        """The built-in's name, the file's stem, or the label."""
        if self.builtin is not None:
            return self.builtin
        return self.path.stem if self.path is not None else self.label

    def cases_path(self) -> Path:
        """Where its case file is: `NAME.cases.toml` beside the rule file (built-ins in `rules/`); the file may
        not exist. Text has none: a `RulesetError`."""
        if self.path is None:
            raise RulesetError(
                "a ruleset given as text has no case file beside it",
                source=self.label,
                fix="pass the case file (--cases FILE)",
                code="no-case-file",
            )
        return self.path.with_name(f"{self.path.name.removesuffix('.toml')}.cases.toml")

    def __str__(self) -> str:
        return self.label


def builtin_dir() -> Path:
    """The folder of built-in rule files: inside the installed package, or `rules/` of a source checkout."""
    package = Path(__file__).parent.parent
    packaged = package / "_rules"
    if packaged.is_dir():
        return packaged
    return package.parent / "rules"


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
        close = did_you_mean(name, [*builtin_names(), *families()])
        hint = f"did you mean {one_of(close)}? Else run" if close else "run"
        raise RulesetError(
            f"no built-in ruleset {name!r}",
            found=repr(name),
            expected=f"one of {', '.join(builtin_names())}, a model_type ({', '.join(sorted(families()))}) "
            "or a path to a .toml file",
            fix=f"{hint} `ownership rules list`, or pass a file path",
            code="unknown-ruleset",
        )
    return path


def looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether a ruleset argument names a file rather than a built-in."""
    path = Path(name_or_path)
    return path.suffix == ".toml" or path.exists() or os.sep in str(name_or_path)


def rule_source(name_or_path: str | os.PathLike[str]) -> RuleSource:
    """The source of a path, a built-in name or a `model_type` (an unknown name lists the known ones)."""
    if looks_like_path(name_or_path):
        return RuleSource.of_file(name_or_path)
    name = str(name_or_path)
    if name not in builtin_names():
        name = builtin_for_family(name) or name
    return RuleSource.of_builtin(name)
