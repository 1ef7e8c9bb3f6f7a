"""Rule files as strict data: pydantic models of rulesets, rules and placements, loaded from TOML.

This layer only parses and checks shape: unknown fields, wrong types and duplicate rule ids are errors that name
the file, the rule id and the field, and list what is allowed. What a rule means (patterns, layouts, axes,
params) is checked by `ownership.spec.program`; nothing here imports torch.

Example:
    >>> spec = parse_ruleset('''
    ... name = "demo"
    ... axes = ["ep"]
    ... default = "replicate"
    ... [params.num_experts]
    ... [[rule]]
    ... id = "routed-expert"
    ... match = "**.experts.<expert>.**"
    ... place = { expert = { over = "ep", strategy = "linear", size = "num_experts" } }
    ... ''', source="demo.toml")
    >>> spec.rules[0].place["expert"].strategy
    'linear'
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ownership.errors import RulesetError, did_you_mean, one_of, short
from ownership.limits import MAX_RULE_FILE_BYTES, over_limit

__all__ = [
    "PARTITION_STRATEGIES",
    "STRATEGIES",
    "Located",
    "ParamSpec",
    "ParamValue",
    "PlacementSpec",
    "RuleSpec",
    "RulesetSpec",
    "StrictModel",
    "explain_validation",
    "load_ruleset_spec",
    "load_toml",
    "parse_ruleset",
    "read_rule_text",
    "ruleset_from_data",
    "ruleset_json_schema",
]

PARTITION_STRATEGIES = ("linear", "round_robin", "table", "layers", "vllm_contiguous")
STRATEGIES = (*PARTITION_STRATEGIES, "shard")

ParamValue = bool | int | str | list[int] | list[list[int]]
PinAt = int | Literal["first", "last"]
SizeRef = int | str


class StrictModel(BaseModel):
    """The base of every file model: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ParamSpec(StrictModel):
    """A model fact that rules refer to by name: a required value, or one with a default."""

    doc: str = ""
    default: ParamValue | None = None
    choices: list[int | str] | None = None
    config: list[str] = Field(
        default_factory=list,
        description="Dotted keys of config.json / adapter_config.json to read the value from, first found wins "
        "(a multimodal config's text section, e.g. text_config, is read before its top level).",
    )
    model_types: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="Values by the config's `model_type`, for what the serving engine does differently per "
        "family (vLLM builds the embeddings on every pipeline stage for some); read after the config keys, "
        "before the default.",
    )
    optional: bool = Field(
        default=False,
        description="No value is no error: a model size that only serves checks (`[dims]`, `sizes`), which are "
        "skipped without it.",
    )


def _joined(value: Any) -> Any:
    """`over = ["dp", "tp"]` as the product axis `dp*tp`."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "*".join(value)
    return value


class PlacementSpec(StrictModel):
    """Place one named index (a key capture, a layout dim or factor) on a mesh axis.

    `strategy` is a strategy name or the name of a param holding one. `size` is the index count (an int, a param
    name or a product such as `num_heads*head_dim`); required for captures, inferred from the layout for dims.
    """

    over: Annotated[str, BeforeValidator(_joined)] = Field(
        description='The mesh axis the index is split over, or an ordered product of axes (`["dp", "tp"]` or '
        '`"dp*tp"`), flattened row-major as vLLM\'s expert-parallel group is.'
    )
    strategy: str = "linear"
    size: SizeRef | None = None
    table: list[list[int]] | str | None = None
    sizes: list[int] | str | None = Field(default=None, description="Explicit stage sizes for `layers`.")
    extra: SizeRef | None = Field(
        default=None,
        description="For `layers`: this many ids past `size`, all on the last coordinate (multi-token-prediction "
        "layers `layers.<num_layers + i>`, which vLLM runs on the last pipeline stage only).",
    )
    parts: list[SizeRef] | None = Field(default=None, description="Unequal packed parts for `shard`.")
    heads: list[SizeRef] | None = Field(
        default=None,
        description="Heads per part for `shard`: a part with fewer heads than coordinates is replicated.",
    )
    uneven: bool = Field(default=False, description="Allow `shard` of a size that does not divide.")
    pad: int | None = Field(
        default=None,
        ge=1,
        description="For `shard`: round the size up to a multiple of this before cutting equal chunks, as vLLM "
        "pads the vocab (64); the last coordinates then hold fewer real rows. A plan reports the padding.",
    )
    align: int | None = Field(
        default=None,
        ge=1,
        description="For `shard`: cut in chunks of ceil(size / (coordinates * align)) * align, the last "
        "coordinates taking what is left, as vLLM cuts quantized blocks (GPT-OSS's MXFP4 experts: 32).",
    )


class RuleSpec(StrictModel):
    """One ownership rule: a key pattern and where its indices live."""

    id: str
    doc: str = ""
    match: str | None = Field(default=None, description="Full-match key template.")
    regex: str | None = Field(
        default=None, description="Raw full-match regex with named groups (escape hatch)."
    )
    layout: str | list[str] | None = Field(
        default=None,
        description="Tensor dims in einops notation, e.g. '(expert r) in'; a list gives the orientations a "
        "family stores the tensor in, and the one the shape and the model's sizes fit is used.",
    )
    sizes: dict[str, SizeRef] = Field(default_factory=dict, description="Known sizes of layout factors.")
    place: dict[str, PlacementSpec] = Field(default_factory=dict)
    pin: dict[str, PinAt | list[PinAt]] = Field(
        default_factory=dict,
        description="Only these coordinates of an axis own the key: first, last, an index, or a list of them.",
    )
    replicate: list[str] = Field(
        default_factory=list,
        description="Axes along which the rule keeps its tensors whole on purpose (a LoRA A that all experts "
        "share, under ep): said so, the linter's silent-replication check leaves them be.",
    )
    drop: bool = False
    rename: str | None = None
    when: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="The rule exists only when every named param has the given value, e.g. "
        "{ tie_word_embeddings = true }.",
    )
    overrides: str | None = Field(
        default=None,
        description="In a ruleset that `extends` another: the id of the inherited rule this one replaces, in place.",
    )
    optional: bool = Field(
        default=False,
        description="The keys it serves are in only some checkpoints it is meant for (a ruleset for several "
        "families, or for models and adapters alike), or are all taken by more specific rules on some (a "
        "fallback): the linter reports it neither dead nor shadowed.",
    )
    variant: str | None = Field(
        default=None,
        description=(
            "Rules that serve one checkpoint layout among several (e.g. per-expert or fused expert LoRA): the "
            "linter expects every rule of a variant that is present to match, and at least one variant present."
        ),
    )

    @model_validator(mode="after")
    def _one_pattern(self) -> RuleSpec:
        if (self.match is None) == (self.regex is None):
            raise ValueError("give exactly one of `match` (a template) or `regex`")
        if self.drop and (self.place or self.pin or self.rename or self.replicate):
            raise ValueError(
                "a dropped rule places nothing: remove `place`, `pin`, `replicate` and `rename`, or `drop`"
            )
        return self


class RulesetSpec(StrictModel):
    """An ordered list of rules; the first whose pattern fully matches a key decides it."""

    name: str
    summary: str = ""
    families: list[str] = Field(default_factory=list, description="config.json model_type values it serves.")
    extends: str | None = Field(
        default=None,
        description="A ruleset this one builds on: a built-in name or a path relative to this file. Its axes, "
        "params, index placements and rules are inherited; rules here come first, and a rule with `overrides` "
        "replaces the inherited rule of that id in place.",
    )
    axes: list[str] = Field(default_factory=list)
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    place: dict[str, PlacementSpec] = Field(
        default_factory=dict,
        description="Placements by index name, applied to every rule that captures or lays out that index and "
        "does not already use the placement's axis.",
    )
    replicated_axes: list[str] = Field(
        default_factory=list,
        description="Axes a mesh may declare that no rule here splits over: every rank along them loads the "
        "same (dp, pcp, dcp and cp always may).",
    )
    fragments: dict[str, str] = Field(
        default_factory=dict,
        description="Named pieces of key templates, used in `match` as ${name} (a fragment may use others): "
        'one place for the prefixes a family\'s keys live under, e.g. model = "{model.,language_model.model.}".',
    )
    dims: dict[str, SizeRef] = Field(
        default_factory=dict,
        description='The model\'s size of each named layout dim (`hidden = "hidden_size"`): a tensor whose dim '
        "of that name has another size is an error, so a transposed tensor is never cut on the wrong dim. A "
        "size whose optional params have no value is not checked.",
    )
    default: Literal["error", "replicate", "drop"] = "error"
    rules: list[RuleSpec] = Field(default_factory=list, alias="rule")

    @model_validator(mode="after")
    def _unique_axes(self) -> RulesetSpec:
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"duplicate axis in axes = {self.axes}")
        return self


def load_toml(text: str, *, source: str, what: str = "") -> dict[str, Any]:
    """Parse TOML; a syntax error is a `RulesetError` naming `source` (`what` names the kind of file), and so are
    nesting past the recursion limit and numbers past Python's digit limit."""
    if len(text) > MAX_RULE_FILE_BYTES:
        raise over_limit(
            what or "the rule file",
            name="MAX_RULE_FILE_BYTES",
            found=f"{len(text):,} characters",
            error=RulesetError,
            source=source,
        )
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = str(error)
    except RecursionError:
        found = "nesting deeper than the interpreter's recursion limit"
    except ValueError as error:
        found = f"a number too long to read ({str(error).split(';')[0]})"
    raise RulesetError(
        f"{what} is not valid TOML" if what else "not valid TOML",
        source=source,
        found=found,
        fix="fix the TOML syntax at that line",
        code="schema",
    )


def read_rule_text(
    path: Path, *, source: str, what: str, fix: str | None = None, code: str = "ruleset"
) -> str:
    """The text of a rule or case file; a file that cannot be read, is not UTF-8 or is too large is a
    `RulesetError` naming it (`what` says which kind of file; `fix` and `code` are those of a missing file)."""
    try:
        size = path.stat().st_size
        if size > MAX_RULE_FILE_BYTES:
            raise over_limit(
                what, name="MAX_RULE_FILE_BYTES", found=f"{size:,} bytes", error=RulesetError, source=source
            )
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise RulesetError(
            f"cannot read {what}", source=source, found=error.strerror, fix=fix, code=code
        ) from None
    except UnicodeDecodeError as error:
        raise RulesetError(
            f"cannot read {what}",
            source=source,
            found=f"bytes that are not UTF-8 ({error.reason} at byte {error.start})",
            expected="a UTF-8 text file",
            fix="save the file as UTF-8",
            code="schema",
        ) from None


def parse_ruleset(text: str, *, source: str = "<string>") -> RulesetSpec:
    """Parse a ruleset from TOML text; every problem is a `RulesetError` naming `source`."""
    return ruleset_from_data(load_toml(text, source=source), source=source)


def load_ruleset_spec(path: str | os.PathLike[str], *, source: str | None = None) -> RulesetSpec:
    """Parse a ruleset file (TOML); `source` is how messages name it (default: the path)."""
    path = Path(path)
    source = source or str(path)
    return parse_ruleset(read_rule_text(path, source=source, what="rule file"), source=source)


def ruleset_from_data(data: dict[str, Any], *, source: str) -> RulesetSpec:
    """Validate already-parsed data (from TOML or JSON) into a `RulesetSpec`."""
    try:
        return RulesetSpec.model_validate(data)
    except ValidationError as error:
        raise explain_validation(
            error, source=source, locate=_locate(data), doc="docs/rule-language.md"
        ) from None


def ruleset_json_schema() -> dict[str, Any]:
    """The JSON Schema of rule files, for editors that validate TOML against a schema."""
    schema = RulesetSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ownership ruleset"
    return schema


_MODELS: dict[str, type[BaseModel]] = {
    "ruleset": RulesetSpec,
    "rule": RuleSpec,
    "placement": PlacementSpec,
    "param": ParamSpec,
}


class Located(NamedTuple):
    """Where a validation problem sits: the rule it is in (if any), words naming the items around it (`case
    'x'`, `expect key 'k'`), the model whose fields apply, and the field's dotted path within that model."""

    rule: str | None
    where: tuple[str, ...]
    model: type[BaseModel]
    field: str | None


def explain_validation(
    error: ValidationError, *, source: str, locate: Callable[[tuple[Any, ...]], Located], doc: str
) -> RulesetError:
    """pydantic's first complaint as one `RulesetError` naming the file, the item, the field and what is
    allowed; `locate` reads a problem's location, `doc` is the page that documents the format.

    Shared by rule files and case files, so both word their problems alike.
    """
    # A misspelled field is also a missing one: name the unknown field, which says what to fix.
    problems = sorted(error.errors(), key=lambda problem: problem["type"] != "extra_forbidden")
    first = problems[0]
    loc = tuple(first["loc"])
    at = locate(loc)
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    # Every problem, one a line: the first is in the message, the others say where else to look.
    others = "\n".join(f"    also: {_problem_text(problem, locate)}" for problem in problems[1:6])
    if len(problems) > 6:
        others += f"\n    ... and {len(problems) - 6} more"
    detail = others or None
    prefix = "".join(f"{part}: " for part in at.where)
    if first["type"] == "extra_forbidden":
        names = sorted(info.alias or name for name, info in at.model.model_fields.items())
        close = did_you_mean(str(loc[-1]), names)
        return RulesetError(
            f"{prefix}unknown field {at.field or '<root>'!r}{more}",
            source=source,
            rule=at.rule,
            found=repr(loc[-1]),
            expected=f"one of: {', '.join(names)}",
            fix=f"correct its spelling (did you mean {one_of(close)}?)"
            if close
            else "remove the field or correct its spelling",
            code="schema",
            detail=detail,
        )
    if first["type"] == "missing":
        return RulesetError(
            f"{prefix}missing required field {at.field or '<root>'!r}{more}",
            source=source,
            rule=at.rule,
            fix=f"add {loc[-1]!r} (see {doc})",
            code="schema",
            detail=detail,
        )
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "value_error" and at.field is None:
        # A model's own check (several fields together), not one field's value.
        return RulesetError(
            f"{prefix}{message}{more}",
            source=source,
            rule=at.rule,
            fix=f"see {doc}",
            code="schema",
            detail=detail,
        )
    return RulesetError(
        f"{prefix}invalid value for {at.field or 'the file'!r}: {message}{more}",
        source=source,
        rule=at.rule,
        found=short(first.get("input")),
        fix=f"see {doc} for the allowed forms",
        code="schema",
        detail=detail,
    )


def _problem_text(problem: Any, locate: Callable[[tuple[Any, ...]], Located]) -> str:
    """One more problem of a validation, in a few words: where, and what."""
    at = locate(tuple(problem["loc"]))
    where = ": ".join([*at.where, *([f"rule {at.rule!r}"] if at.rule else [])])
    what = {"extra_forbidden": "unknown field", "missing": "missing field"}.get(
        problem["type"], str(problem["msg"]).removeprefix("Value error, ")
    )
    field = f" {at.field!r}" if at.field else ""
    return f"{where + ': ' if where else ''}{what}{field}"


def _locate(data: dict[str, Any]) -> Callable[[tuple[Any, ...]], Located]:
    """A rule file's locations: the rule id (if inside a rule), the model and a readable field path."""

    def locate(loc: tuple[Any, ...]) -> Located:
        rule_id: str | None = None
        model = "ruleset"
        if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
            rules = data.get("rule")
            if isinstance(rules, list) and loc[1] < len(rules) and isinstance(rules[loc[1]], dict):
                rule_id = str(rules[loc[1]].get("id", f"#{loc[1] + 1}"))
            else:
                rule_id = f"#{loc[1] + 1}"
            model = "rule"
            rest = loc[2:]
            if len(rest) >= 2 and rest[0] == "place":
                model = "placement" if len(rest) >= 3 else "rule"
            parts = rest
        else:
            if len(loc) >= 3 and loc[0] == "place":
                model = "placement"
            elif len(loc) >= 2 and loc[0] == "params":
                model = "param" if len(loc) >= 3 else "ruleset"
            parts = loc
        return Located(rule_id, (), _MODELS[model], ".".join(str(p) for p in parts) or None)

    return locate
