"""Case files: annotated keys with a mesh and params, and what a ruleset must decide for each (the format;
`ownership.lint.cases` runs them).

A case file (`NAME.cases.toml` beside the rule file; format in docs/cases.md) holds cases. A case fixes a
mesh, params and optionally a config, and lists checks on keys:

- `[[case.expect]]`: the rule that must decide the key, the exact set of owning ranks, and optionally the
  selection and local key on some ranks;
- `ok`: keys that no rule may match (they fall to the ruleset's `default`);
- `[[case.error]]`: keys that must fail, with the error's code and/or a part of its message.

A file that does not parse is a `RulesetError` naming the file, the case, the key and the field.

Example:
    >>> cases = parse_cases('''
    ... [[case]]
    ... name = "uneven linear"
    ... mesh = "ep=4"
    ... params = { num_experts = 10 }
    ... [[case.expect]]
    ... key = "m.layers.0.mlp.experts.6.up_proj.lora_A.weight"
    ... rule = "routed-expert"
    ... owners = [2]
    ... ''', source="demo.cases.toml")
    >>> [(case.name, case.expect[0].owners) for case in cases.cases]
    [('uneven linear', [2])]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator

from ownership.errors import MeshError
from ownership.placement.mesh import Mesh
from ownership.placement.selection import parse_selection
from ownership.ruleset import Ruleset
from ownership.spec.builtin import RuleSource, rule_source
from ownership.spec.schema import Located, StrictModel, explain_validation, load_toml, read_rule_text

__all__ = [
    "Case",
    "CaseFile",
    "ExpectError",
    "ExpectOwners",
    "case_file_for",
    "load_cases",
    "parse_cases",
]

ALL = "all"


def _owners_form(value: Any) -> Any:
    # Checked before pydantic's union validation, so a bad value gets one clear message, not one per member.
    if value == ALL or (isinstance(value, list) and all(type(r) is int and r >= 0 for r in value)):
        return value
    raise ValueError(f'owners is a list of flat ranks (e.g. [0, 2], [] for nobody) or "all", not {value!r}')


def _per_rank_form(value: Any) -> Any:
    if isinstance(value, dict):
        for rank in value:
            if not (isinstance(rank, str) and rank.isdigit()):
                raise ValueError(f"per-rank tables are keyed by flat rank (e.g. {{ 2 = ... }}), not {rank!r}")
    return value


def _selection_form(value: Any) -> Any:
    if isinstance(value, dict):
        for selection in value.values():
            parse_selection(selection)
    return value


class ExpectOwners(StrictModel):
    """`[[case.expect]]`: a key, the rule that must decide it and exactly who owns it."""

    key: str
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    rule: str
    owners: Annotated[list[int] | Literal["all"], BeforeValidator(_owners_form)]
    selection: Annotated[
        dict[str, Any], BeforeValidator(_per_rank_form), BeforeValidator(_selection_form)
    ] = Field(default_factory=dict)
    local_key: Annotated[dict[str, str], BeforeValidator(_per_rank_form)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ExpectOwners:
        listed = self.listed_owners()
        if listed is not None and len(set(listed)) != len(listed):
            raise ValueError(f"owners {listed} lists a rank twice")
        for rank, value in self.selection.items():
            if listed is not None and int(rank) not in listed:
                raise ValueError(f"selection given for rank {rank}, which is not in owners {listed}")
            selection = parse_selection(value)
            if selection is not None and self.shape is None:
                raise ValueError(f"selection on rank {rank} needs the tensor's `shape`")
            if selection is not None and self.shape is not None and len(selection) != len(self.shape):
                raise ValueError(
                    f"selection on rank {rank} has {len(selection)} dims, the shape {self.shape} has "
                    f"{len(self.shape)}"
                )
        for rank in self.local_key:
            if listed is not None and int(rank) not in listed:
                raise ValueError(f"local_key given for rank {rank}, which is not in owners {listed}")
        return self

    def listed_owners(self) -> list[int] | None:
        """The owners as written, or None for `"all"`."""
        return None if isinstance(self.owners, str) else self.owners

    def expected_owners(self, num_ranks: int) -> list[int]:
        """The owning ranks, sorted, on a mesh of `num_ranks`."""
        listed = self.listed_owners()
        return list(range(num_ranks)) if listed is None else sorted(listed)


class ExpectError(StrictModel):
    """`[[case.error]]`: a key that must fail with this error `code` and/or a `message` holding this text."""

    key: str
    shape: list[Annotated[int, Field(ge=0)]] | None = None
    code: str | None = None
    message: str | None = None
    rule: str | None = None

    @model_validator(mode="after")
    def _something_to_check(self) -> ExpectError:
        if self.code is None and self.message is None:
            raise ValueError("an error check needs `code`, `message` or both")
        return self


class Case(StrictModel):
    """`[[case]]`: a mesh, params (and a config to read params from), and the checks made under them."""

    name: str
    mesh: str
    params: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
    expect: list[ExpectOwners] = Field(default_factory=list)
    ok: list[str] = Field(default_factory=list)
    error: list[ExpectError] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits_mesh(self) -> Case:
        try:
            num_ranks = Mesh.parse(self.mesh).num_ranks
        except MeshError as error:
            raise ValueError(f"bad mesh: {error}") from None
        if not (self.expect or self.ok or self.error):
            raise ValueError("the case checks nothing: add [[case.expect]], ok or [[case.error]]")
        for expect in self.expect:
            ranks = [
                *(expect.listed_owners() or []),
                *map(int, expect.selection),
                *map(int, expect.local_key),
            ]
            outside = sorted({r for r in ranks if r >= num_ranks})
            if outside:
                raise ValueError(
                    f"key {expect.key!r}: ranks {outside} are outside the mesh {self.mesh} "
                    f"(flat ranks 0..{num_ranks - 1})"
                )
        return self


class _CaseFileSpec(StrictModel):
    ruleset: str | None = None
    cases: list[Case] = Field(alias="case", min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> _CaseFileSpec:
        names = [case.name for case in self.cases]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"case names must be unique; given more than once: {twice}")
        return self


@dataclass(frozen=True)
class CaseFile:
    """A parsed case file: where it came from, the ruleset it names (if any), and its cases in order."""

    source: str
    ruleset: str | None
    cases: tuple[Case, ...]


_FIELDS: dict[str, type[BaseModel]] = {
    "file": _CaseFileSpec,
    "case": Case,
    "expect": ExpectOwners,
    "error": ExpectError,
}


def parse_cases(text: str, *, source: str = "<cases>") -> CaseFile:
    """Parse case-file TOML; every problem is a `RulesetError` naming `source`, the case and the field.

    >>> from ownership.errors import RulesetError
    >>> try:
    ...     parse_cases('[[case]]\\nname = "x"\\nmesh = "ep=2"\\nowners = [0]\\n', source="c.toml")
    ... except RulesetError as error:
    ...     print(error.source, error.message, error.expected, sep="\\n")
    c.toml
    case 'x': unknown field 'owners'
    one of: config, error, expect, mesh, name, ok, params
    """
    data = load_toml(text, source=source, what="case file")
    try:
        spec = _CaseFileSpec.model_validate(data)
    except ValidationError as error:
        raise explain_validation(error, source=source, locate=_locate(data), doc="docs/cases.md") from None
    return CaseFile(source=source, ruleset=spec.ruleset, cases=tuple(spec.cases))


def load_cases(path: str | os.PathLike[str]) -> CaseFile:
    """Read and parse a case file; messages name it by `path`."""
    text = read_rule_text(
        Path(path),
        source=str(path),
        what="case file",
        fix="check the path, or write one (docs/cases.md)",
        code="no-case-file",
    )
    return parse_cases(text, source=str(path))


def _locate(data: Any) -> Callable[[tuple[Any, ...]], Located]:
    """A case file's locations: the case by name, the check by its key, the model and the field's path."""

    def locate(loc: tuple[Any, ...]) -> Located:
        where: list[str] = []
        model = "file"
        rest: tuple[Any, ...] = loc
        if len(loc) >= 2 and loc[0] == "case" and isinstance(loc[1], int):
            case = _item(data, "case", loc[1])
            where.append(f"case {case.get('name', f'#{loc[1] + 1}')!r}")
            model, rest = "case", loc[2:]
            if len(rest) >= 2 and rest[0] in ("expect", "error") and isinstance(rest[1], int):
                item = _item(case, str(rest[0]), rest[1])
                label = f"key {item['key']!r}" if isinstance(item.get("key"), str) else f"#{rest[1] + 1}"
                where.append(f"{rest[0]} {label}")
                model, rest = str(rest[0]), rest[2:]
        return Located(None, tuple(where), _FIELDS[model], ".".join(str(part) for part in rest) or None)

    return locate


def _item(data: Any, name: str, index: int) -> dict[str, Any]:
    items = data.get(name) if isinstance(data, dict) else None
    item = items[index] if isinstance(items, list) and index < len(items) else None
    return item if isinstance(item, dict) else {}


def case_file_for(ruleset: str | os.PathLike[str] | Ruleset | RuleSource) -> Path:
    """Where a ruleset's case file is: `NAME.cases.toml` in the built-in folder for a built-in name, or beside
    the rule file for a path (`my/rules.toml` -> `my/rules.cases.toml`). The file may not exist.

        >>> case_file_for("vllm-ep-lora").name, case_file_for("my/moe.toml").as_posix()
        ('vllm-ep-lora.cases.toml', 'my/moe.cases.toml')
    """
    if isinstance(ruleset, Ruleset):
        return ruleset.origin.cases_path()
    if isinstance(ruleset, RuleSource):
        return ruleset.cases_path()
    return rule_source(ruleset).cases_path()
