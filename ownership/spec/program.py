"""A ruleset as a checked program: patterns, layouts and placements checked and prepared, before any params.

`analyze(spec)` turns each rule into an `AnalyzedRule` (compiled pattern, parsed layout, which placed names are
key captures and which are tensor dims) and joins every rule's pattern into one alternation, so that deciding a
key is one regex match whose matching branch names the rule: first match wins, with no loop over rules.
`Program.classify(key)` is the one place that answers "which rule takes this key, with which captures".

`check(spec)` analyses every rule once and returns the program together with every static problem (the linter
reports them all); `analyze` raises the first.

Example:
    >>> from ownership.spec.schema import parse_ruleset
    >>> spec = parse_ruleset('''
    ... name = "demo"
    ... axes = ["ep"]
    ... [params.num_experts]
    ... [[rule]]
    ... id = "routed-expert"
    ... match = "**.experts.<expert>.**"
    ... place = { expert = { over = "ep", size = "num_experts" } }
    ... ''')
    >>> program = analyze(spec)
    >>> found = program.classify("layers.0.experts.5.w1.weight")
    >>> found.rule.id, found.captures
    ('routed-expert', {'expert': 5})
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ownership import limits
from ownership.errors import RulesetError, did_you_mean, one_of
from ownership.spec.layout import Layout, parse_layout
from ownership.spec.params import size_names
from ownership.spec.schema import PARTITION_STRATEGIES, STRATEGIES, PlacementSpec, RulesetSpec, RuleSpec
from ownership.spec.template import CaptureKind, CompiledPattern, compile_raw_regex, compile_template

__all__ = [
    "AnalyzedRule",
    "Classified",
    "Match",
    "Program",
    "RenamePiece",
    "analyze",
    "check",
    "compile_fullmatch",
    "effective_place",
    "param_users",
]


class Match(Protocol):
    """What `re.Match` and `regex.Match` share, as used here."""

    lastgroup: str | None

    def group(self, name: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class RenamePiece:
    """A literal followed by an optional capture reference (`{name}` or `{name.local}`)."""

    literal: str
    name: str | None = None
    local: bool = False


@dataclass(frozen=True)
class AnalyzedRule:
    """One rule, checked and prepared; independent of params and mesh."""

    index: int
    spec: RuleSpec
    pattern: CompiledPattern
    layouts: tuple[Layout, ...]
    """The tensor's layout, or the orientations a family stores it in (all naming the same dims); empty when
    the rule has none."""
    captured: dict[str, tuple[str, PlacementSpec]]
    """Placed key captures: name -> (group name in the joined pattern, placement)."""
    dims: dict[str, PlacementSpec]
    """Placed layout dims and factors."""
    rename: tuple[RenamePiece, ...] | None
    groups: dict[str, str]
    """Every capture: name -> group name in the joined pattern."""
    place: dict[str, PlacementSpec]
    """The rule's own placements and those it takes from the ruleset's `[place]`."""
    companion_of: int | None = None
    """For a rule derived to decide a quantized weight's companions (`X.qweight`, `X.weight_scale_inv`): the
    index of the rule for `X.weight` it follows."""

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def layout(self) -> Layout | None:
        """The first (or only) layout; every alternative names the same dims and factors."""
        return self.layouts[0] if self.layouts else None

    def capture_value(self, match: Match, name: str) -> int | str:
        text: str | None = match.group(self.groups[name])
        if text is None:
            return ""
        return int(text) if self.pattern.captures[name] == "int" and text.isdigit() else text

    def captures(self, match: Match) -> dict[str, int | str]:
        return {name: self.capture_value(match, name) for name in self.groups}


class Classified(NamedTuple):
    """The rule that decides a key, and its match (whose groups hold the captures)."""

    rule: AnalyzedRule
    match: Match

    @property
    def captures(self) -> dict[str, int | str]:
        """Every capture of the rule, as an int or text."""
        return self.rule.captures(self.match)


@dataclass(frozen=True)
class Program:
    """Every rule of a ruleset and their joined pattern."""

    spec: RulesetSpec
    source: str
    rules: tuple[AnalyzedRule, ...]
    by_group: dict[str, AnalyzedRule]
    regex: str
    match: Any
    """`fullmatch` of the joined pattern (the standard library's `re`)."""
    group_numbers: dict[str, int]
    """Number of each group of the joined pattern (a rule's outer group `_r<index>` is the cheapest to test)."""

    def classify(self, key: str) -> Classified | None:
        """The first rule whose pattern fully matches `key`, with the match; None when no rule does."""
        m = self.match(key)
        return None if m is None else Classified(self.by_group[m.lastgroup], m)

    def subset(self, rules: tuple[AnalyzedRule, ...]) -> Program:
        """The same ruleset with only `rules` (in their order) in the joined pattern."""
        return _join(self.spec, self.source, rules)

    def with_companions(self, suffixes: Sequence[str]) -> Program:
        """The program with, before each rule for a linear layer's `X.weight` (a 2-D layout or none), a rule
        that decides `X.<suffix>` for each of `suffixes`: the tensors a quantization family stores beside, or
        instead of, the weight. Each follows its weight's placement (`ownership.compile.quant`)."""
        if not suffixes:
            return self
        tail = r"\.weight"
        alternatives = "|".join(re.escape(s) for s in sorted(suffixes, key=len, reverse=True))
        out: list[AnalyzedRule] = []
        next_index = 1 + max((rule.index for rule in self.rules), default=-1)
        for rule in self.rules:
            regex = rule.pattern.regex
            linear = all(len(layout.dims) == 2 for layout in rule.layouts)
            if regex.endswith(tail) and linear and "lora_" not in regex and rule.companion_of is None:
                index, next_index = next_index, next_index + 1
                groups = {name: f"r{index}_{name}" for name in rule.groups}
                out.append(
                    dataclasses.replace(
                        rule,
                        index=index,
                        pattern=CompiledPattern(
                            source=rule.pattern.source,
                            regex=regex[: -len(tail)] + rf"\.(?:{alternatives})",
                            captures=rule.pattern.captures,
                        ),
                        groups=groups,
                        captured={n: (groups[n], p) for n, (_, p) in rule.captured.items()},
                        companion_of=rule.index,
                    )
                )
            out.append(rule)
        return _join(self.spec, self.source, tuple(out))


_GROUP = re.compile(r"\(\?P?<([A-Za-z_][A-Za-z0-9_]*)>")
_BACKREF = re.compile(r"\(\?P=([A-Za-z_][A-Za-z0-9_]*)\)")
_RENAME = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.local)?\}")


def analyze(spec: RulesetSpec, *, source: str = "<string>") -> Program:
    """Check and prepare every rule; raises the first problem as a `RulesetError`."""
    program, found = check(spec, source=source)
    if program is None:
        raise found[0]
    return program


def check(spec: RulesetSpec, *, source: str = "<string>") -> tuple[Program | None, list[RulesetError]]:
    """Every rule analysed once: the program (None when there are problems) and every static problem, in rule
    order."""
    if len(spec.rules) > limits.MAX_RULES:
        raise limits.over_limit(
            "the number of rules",
            name="MAX_RULES",
            found=f"{len(spec.rules):,} rules",
            error=RulesetError,
            source=source,
            fix="merge rules, or split the ruleset",
        )
    sink: list[RulesetError] = []
    for name, ref in spec.dims.items():
        for param in size_names(ref):
            if param not in spec.params:
                sink.append(
                    RulesetError(
                        f"[dims] {name} refers to undeclared param {param!r}",
                        source=source,
                        expected=f"one of the declared params {sorted(spec.params)}",
                        fix=f"declare it with [params.{param}] (optional = true if configs may lack it)",
                        code="unknown-param",
                    )
                )
    seen: set[str] = set()
    analyzed = []
    for i, rule in enumerate(spec.rules):
        if rule.id in seen:
            sink.append(
                RulesetError(
                    f"duplicate rule id {rule.id!r}",
                    source=source,
                    rule=rule.id,
                    found=f"rule #{i + 1} reuses it",
                    expected="unique rule ids",
                    fix="rename one of the rules",
                    code="duplicate-rule-id",
                )
            )
        seen.add(rule.id)
        analyzed.append(_analyze_rule(i, rule, spec, source=source, sink=sink))
    return (None if sink else _join(spec, source, tuple(analyzed))), sink


def param_users(spec: RulesetSpec) -> dict[str, list[str]]:
    """For each param, the ids of the rules (or `[place.NAME]` tables) that refer to it."""
    users: dict[str, list[str]] = {}
    for rule in spec.rules:
        names: set[str] = set(rule.when)
        for ref in rule.sizes.values():
            names.update(size_names(ref))
        for placement in rule.place.values():
            names.update(_placement_params(placement, spec))
        for name in sorted(names):
            users.setdefault(name, []).append(rule.id)
    for index, placement in spec.place.items():
        for name in sorted(_placement_params(placement, spec)):
            users.setdefault(name, []).append(f"[place.{index}]")
    return users


def effective_place(
    rule: RuleSpec, spec: RulesetSpec, *, captures: Mapping[str, CaptureKind], layout: Layout | None
) -> dict[str, PlacementSpec]:
    """The rule's placements plus each ruleset-level `[place.NAME]` whose index the rule captures or lays out,
    unless the rule already places that index or uses that axis (by a placement or a pin)."""
    place = dict(rule.place)
    used = {axis for p in place.values() for axis in p.over.split("*")} | set(rule.pin)
    for name, placement in spec.place.items():
        if name in place or placement.over in used:
            continue
        if name in captures or (layout is not None and name in layout.names):
            place[name] = placement
            used.update(placement.over.split("*"))
    return place


def _placement_params(placement: PlacementSpec, spec: RulesetSpec) -> set[str]:
    names: set[str] = set()
    for size in (placement.size, placement.extra, *(placement.parts or ()), *(placement.heads or ())):
        if size is not None:
            names.update(size_names(size))
    for ref in (placement.table, placement.sizes):
        if isinstance(ref, str):
            names.add(ref)
    if placement.strategy not in STRATEGIES:
        names.add(placement.strategy)
    return names


def _analyze_rule(
    index: int, rule: RuleSpec, spec: RulesetSpec, *, source: str, sink: list[RulesetError]
) -> AnalyzedRule:
    report = sink.append

    try:
        if rule.match is not None:
            pattern = compile_template(
                expand_fragments(rule.match, spec, rule=rule.id, source=source), rule=rule.id, source=source
            )
        else:
            pattern = compile_raw_regex(rule.regex or "", rule=rule.id, source=source)
    except RulesetError as error:
        report(error)
        pattern = CompiledPattern(source=rule.match or rule.regex or "", regex="(?!)", captures={})
    layouts: list[Layout] = []
    for text in [rule.layout] if isinstance(rule.layout, str) else rule.layout or []:
        try:
            layouts.append(parse_layout(text, rule=rule.id, source=source))
        except RulesetError as error:
            report(error)
    if isinstance(rule.layout, list) and not rule.layout:
        report(
            RulesetError(
                "empty list of layouts",
                source=source,
                rule=rule.id,
                fix="give a layout, a list of the orientations the tensor is stored in, or no `layout`",
                code="layout-error",
            )
        )
    layout = layouts[0] if layouts else None
    group_names = {name: f"r{index}_{name}" for name in pattern.captures}
    captured: dict[str, tuple[str, PlacementSpec]] = {}
    dims: dict[str, PlacementSpec] = {}
    axes_used: dict[str, str] = {}
    place = effective_place(rule, spec, captures=pattern.captures, layout=layout)
    for param in rule.when:
        if param not in spec.params:
            report(_unknown_param(param, rule, spec, source))
    for name, placement in place.items():
        for problem in _placement_problems(name, placement, rule, spec, pattern.captures, layout, source):
            report(problem)
        overlap = [axis for axis in placement.over.split("*") if axis in axes_used]
        if overlap:
            report(
                RulesetError(
                    f"indices {axes_used[overlap[0]]!r} and {name!r} are both placed on axis {overlap[0]!r}",
                    source=source,
                    rule=rule.id,
                    expected="at most one index per axis",
                    fix="place one of them on another axis, or fold them into one layout factor",
                    code="axis-placed-twice",
                )
            )
        axes_used.update(dict.fromkeys(placement.over.split("*"), name))
        if name in pattern.captures:
            captured[name] = (group_names[name], placement)
        elif layout is not None and name in layout.names:
            dims[name] = placement
    for other in layouts[1:] if len(layouts) > 1 else ():
        missing = [name for name in dims if name not in other.names]
        if missing:
            report(
                RulesetError(
                    f"layout {other.source!r} does not name {', '.join(map(repr, missing))}, which the rule places",
                    source=source,
                    rule=rule.id,
                    found=f"{other.source!r} beside {layouts[0].source!r}",
                    expected="every layout of a rule naming every dim it places",
                    fix="name the placed dims in each layout, or split the rule",
                    code="layout-error",
                )
            )
    for axis in rule.replicate:
        if axis not in spec.axes:
            report(_unknown_axis(axis, rule, spec, source, what="replicate"))
        if axis in axes_used or axis in rule.pin:
            report(
                RulesetError(
                    f"axis {axis!r} is both replicated and "
                    + (f"placed by index {axes_used[axis]!r}" if axis in axes_used else "pinned"),
                    source=source,
                    rule=rule.id,
                    fix="replicate along an axis, or split or pin on it, not both",
                    code="axis-placed-twice",
                )
            )
    for axis, pinned in rule.pin.items():
        if axis not in spec.axes:
            report(_unknown_axis(axis, rule, spec, source, what="pin"))
        if axis in axes_used:
            report(
                RulesetError(
                    f"axis {axis!r} is both pinned and placed by index {axes_used[axis]!r}",
                    source=source,
                    rule=rule.id,
                    fix="pin a tensor or partition an index along an axis, not both",
                    code="axis-placed-twice",
                )
            )
        for at in pinned if isinstance(pinned, list) else [pinned]:
            if isinstance(at, int) and at < 0:
                report(
                    RulesetError(
                        f"pin at {at} on axis {axis!r}",
                        source=source,
                        rule=rule.id,
                        expected="first, last or an index >= 0",
                        fix="use a coordinate >= 0",
                        code="bad-pin",
                    )
                )
    named = {name for each in layouts for name in each.names}
    for name, ref in rule.sizes.items():
        if name not in named:
            report(
                RulesetError(
                    f"size given for {name!r}, which the layout does not name",
                    source=source,
                    rule=rule.id,
                    found=str(rule.layout or "no layout"),
                    fix="name it in the layout or remove it from `sizes`",
                    code="unknown-index",
                )
            )
        for param in size_names(ref):
            if param not in spec.params:
                report(_unknown_param(param, rule, spec, source))
    rename = _parse_rename(rule, captured, pattern.captures, source, report)
    return AnalyzedRule(
        index=index,
        spec=rule,
        pattern=pattern,
        layouts=tuple(layouts),
        captured=captured,
        dims=dims,
        rename=rename,
        groups=group_names,
        place=place,
    )


_FRAGMENT = re.compile(r"\$\{([^}]*)\}")


def expand_fragments(template: str, spec: RulesetSpec, *, rule: str | None = None, source: str = "") -> str:
    """`template` with every `${name}` replaced by the ruleset's fragment of that name (fragments may use other
    fragments; a cycle, an unknown name or a capture inside a fragment is a `RulesetError`).

    Example:
        >>> spec = RulesetSpec(name="t", fragments={"model": "{model.,language_model.model.}"})
        >>> expand_fragments("${model}layers.<layer>.**", spec)
        '{model.,language_model.model.}layers.<layer>.**'
    """

    def expand(text: str, chain: tuple[str, ...]) -> str:
        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in spec.fragments:
                close = did_you_mean(name, spec.fragments)
                raise RulesetError(
                    f"unknown fragment ${{{name}}} in the pattern",
                    source=source,
                    rule=rule,
                    found=repr(name),
                    expected=f"one of the ruleset's fragments {sorted(spec.fragments)}",
                    fix="define it under [fragments], or correct the name"
                    + (f" (did you mean {one_of(close)}?)" if close else ""),
                    code="pattern-error",
                )
            if name in chain:
                raise RulesetError(
                    f"fragment ${{{name}}} uses itself",
                    source=source,
                    rule=rule,
                    found=" -> ".join([*chain, name]),
                    fix="break the cycle in [fragments]",
                    code="pattern-error",
                )
            body = spec.fragments[name]
            if "<" in body:
                raise RulesetError(
                    f"fragment ${{{name}}} holds a capture",
                    source=source,
                    rule=rule,
                    found=repr(body),
                    expected="literal text, `*`, `**` and {a,b} alternatives",
                    fix="keep captures in the rule's own pattern, where they are placed",
                    code="pattern-error",
                )
            return expand(body, (*chain, name))

        return _FRAGMENT.sub(one, text)

    return expand(template, ())


def _placement_problems(
    name: str,
    placement: PlacementSpec,
    rule: RuleSpec,
    spec: RulesetSpec,
    captures: dict[str, CaptureKind],
    layout: Layout | None,
    source: str,
) -> list[RulesetError]:
    out: list[RulesetError] = []
    for axis in placement.over.split("*"):
        if axis not in spec.axes:
            out.append(_unknown_axis(axis, rule, spec, source, what=f"place.{name}.over"))
    in_key = name in captures
    in_layout = layout is not None and name in layout.names
    if not in_key and not in_layout:
        known = sorted([*captures, *(layout.names if layout else ())])
        out.append(
            RulesetError(
                f"index {name!r} is placed but never captured",
                source=source,
                rule=rule.id,
                found=f"captures {known}" if known else "no captures and no layout",
                expected=f"<{name}> in the pattern or {name!r} in the layout",
                fix=f"capture it with <{name}> in `match`, name it in `layout`, or fix the spelling",
                code="placed-not-captured",
            )
        )
    if in_key and captures[name] != "int":
        out.append(
            RulesetError(
                f"index {name!r} is a text capture and cannot be placed",
                source=source,
                rule=rule.id,
                found=f"<{name}:{captures[name]}>",
                expected=f"<{name}> (an integer capture)",
                fix=f"capture it as <{name}>",
                code="placed-text-capture",
            )
        )
    strategy = placement.strategy
    if strategy not in STRATEGIES and strategy not in spec.params:
        out.append(
            RulesetError(
                f"unknown strategy {strategy!r} for index {name!r}",
                source=source,
                rule=rule.id,
                expected=f"one of {', '.join(STRATEGIES)}, or the name of a declared param",
                fix="correct the spelling or declare the param under [params]",
                code="unknown-strategy",
            )
        )
    if in_key and strategy == "shard":
        out.append(
            RulesetError(
                f"captured index {name!r} cannot be sharded",
                source=source,
                rule=rule.id,
                expected=f"a partition strategy ({', '.join(PARTITION_STRATEGIES)})",
                fix="use `shard` on tensor dims from the layout, and a partition strategy on captures",
                code="bad-strategy",
            )
        )
    if in_key and placement.size is None and placement.table is None:
        out.append(
            RulesetError(
                f"captured index {name!r} has no size",
                source=source,
                rule=rule.id,
                expected='size = <int or param>, e.g. size = "num_experts"',
                fix=f"add size to place.{name}",
                code="missing-size",
            )
        )
    if (placement.parts is not None or placement.heads is not None) and strategy != "shard":
        out.append(
            RulesetError(
                f"`parts`/`heads` on index {name!r} only apply to strategy `shard`",
                source=source,
                rule=rule.id,
                found=f"strategy {strategy!r}",
                fix='use strategy = "shard" or remove them',
                code="bad-strategy",
            )
        )
    if placement.extra is not None and strategy not in ("layers",) and strategy in STRATEGIES:
        out.append(
            RulesetError(
                f"`extra` on index {name!r} only applies to strategy `layers`",
                source=source,
                rule=rule.id,
                found=f"strategy {strategy!r}",
                fix='use strategy = "layers" or remove extra',
                code="bad-strategy",
            )
        )
    if (placement.pad is not None or placement.align is not None) and (
        strategy != "shard"
        or placement.parts is not None
        or placement.uneven
        or (placement.pad is not None and placement.align is not None)
    ):
        out.append(
            RulesetError(
                f"`pad` or `align` on index {name!r} only applies to strategy `shard`, alone (no `parts`, "
                "`uneven`, or both)",
                source=source,
                rule=rule.id,
                found=f"strategy {strategy!r}"
                + (" with parts" if placement.parts else "")
                + (" with uneven" if placement.uneven else ""),
                fix='use strategy = "shard" with pad or align alone, or remove them',
                code="bad-strategy",
            )
        )
    if placement.heads is not None and len(placement.heads) != len(placement.parts or ()):
        out.append(
            RulesetError(
                f"`heads` of index {name!r} must list one count per part",
                source=source,
                rule=rule.id,
                found=f"{len(placement.heads)} heads for {len(placement.parts or ())} parts",
                fix="give `parts` and `heads` the same length",
                code="bad-strategy",
            )
        )
    for param in sorted(_placement_params(placement, spec) - set(STRATEGIES)):
        if param not in spec.params and not (param == strategy and strategy not in spec.params):
            out.append(_unknown_param(param, rule, spec, source))
    return out


def _unknown_axis(axis: str, rule: RuleSpec, spec: RulesetSpec, source: str, *, what: str) -> RulesetError:
    close = did_you_mean(axis, spec.axes)
    return RulesetError(
        f"unknown axis {axis!r} in {what}",
        source=source,
        rule=rule.id,
        found=repr(axis),
        expected=f"one of the ruleset's axes {spec.axes}",
        fix=f"add {axis!r} to `axes` at the top of the file, or correct the spelling"
        + (f" (did you mean {one_of(close)}?)" if close else ""),
        code="unknown-axis",
    )


def _unknown_param(param: str, rule: RuleSpec, spec: RulesetSpec, source: str) -> RulesetError:
    return RulesetError(
        f"rule refers to undeclared param {param!r}",
        source=source,
        rule=rule.id,
        expected=f"one of the declared params {sorted(spec.params)}",
        fix=f"declare it with [params.{param}] or correct the spelling",
        code="unknown-param",
    )


def _parse_rename(
    rule: RuleSpec,
    captured: dict[str, tuple[str, PlacementSpec]],
    captures: dict[str, CaptureKind],
    source: str,
    report: Any,
) -> tuple[RenamePiece, ...] | None:
    if rule.rename is None:
        return None
    pieces: list[RenamePiece] = []
    pos = 0
    for m in _RENAME.finditer(rule.rename):
        name, local = m.group(1), m.group(2) is not None
        if name not in captures:
            report(
                RulesetError(
                    f"rename refers to {{{name}}}, which the pattern does not capture",
                    source=source,
                    rule=rule.id,
                    found=rule.rename,
                    expected=f"captures {sorted(captures)}",
                    fix=f"capture <{name}> in the pattern or fix the rename",
                    code="bad-rename",
                )
            )
        elif local and name not in captured:
            report(
                RulesetError(
                    f"rename uses {{{name}.local}}, but {name!r} is not placed",
                    source=source,
                    rule=rule.id,
                    fix=f"place {name!r} on an axis, or use {{{name}}}",
                    code="bad-rename",
                )
            )
        pieces.append(RenamePiece(rule.rename[pos : m.start()], name, local))
        pos = m.end()
    pieces.append(RenamePiece(rule.rename[pos:]))
    return tuple(pieces)


def compile_fullmatch(pattern: str) -> Any:
    """`fullmatch` of a pattern (templates and checked raw regexes: the standard library's syntax)."""
    return re.compile(pattern).fullmatch


def _join(spec: RulesetSpec, source: str, rules: tuple[AnalyzedRule, ...]) -> Program:
    branches = []
    for rule in rules:
        index = rule.index
        body = _GROUP.sub(lambda m, i=index: f"(?P<r{i}_{m.group(1)}>", rule.pattern.regex)  # type: ignore[misc]
        body = _BACKREF.sub(lambda m, i=index: f"(?P=r{i}_{m.group(1)})", body)  # type: ignore[misc]
        branches.append(f"(?P<_r{index}>{body})")
    joined = "|".join(branches) or "(?!)"
    fullmatch = compile_fullmatch(joined)
    by_group = {f"_r{rule.index}": rule for rule in rules}
    numbers = dict(getattr(fullmatch.__self__, "groupindex", {}))
    return Program(
        spec=spec,
        source=source,
        rules=rules,
        by_group=by_group,
        regex=joined,
        match=fullmatch,
        group_numbers=numbers,
    )
