r"""Key templates: full-match patterns over dotted tensor names, compiled to regular expressions.

Template syntax (a template always matches the whole key):

| token | matches |
|---|---|
| `<name>` or `<name:int>` | one segment of decimal digits, captured as an int (`007` is 7) |
| `<name:seg>` | one segment, captured as text |
| `<name:path>` | one or more segments, captured as text (lazy: the shortest that lets the rest match) |
| `*` | exactly one segment (inside a segment, `*` is any run of non-dot characters) |
| `**` | any number of whole segments, zero included; lazy, so the leftmost binding wins |
| `{a,b}` | alternation of literal text (may contain dots and be empty: `{base_layer.,}`) |

Anything else is literal. A raw regex (the `regex` field of a rule) is the escape hatch; its named groups become
captures: an int capture when the group is exactly `[0-9]+`, `[0-9]++` or `\d+`, else text.

Example:
    >>> t = compile_template("**.experts.<expert>.**", rule="routed")
    >>> t.captures
    {'expert': 'int'}
    >>> import re
    >>> re.fullmatch(t.regex, "model.layers.0.mlp.experts.7.w1.weight").group("expert")
    '7'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import regex as _regex

from ownership.errors import RulesetError

__all__ = ["CaptureKind", "CompiledPattern", "compile_raw_regex", "compile_template"]

CaptureKind = Literal["int", "seg", "path"]

# Possessive where a segment ends at a dot: a segment never contains one, so giving back characters cannot help a
# match, and not trying saves the engine most of its work on long keys.
_CAPTURE_REGEX: dict[str, str] = {"int": "[0-9]++", "seg": "[^.]++", "path": "[^.]++(?:\\.[^.]++)*?"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    """A pattern as regex source with named groups, and the kind of each capture."""

    source: str
    regex: str
    captures: dict[str, CaptureKind]


def _error(
    message: str, template: str, pos: int, *, rule: str | None, source: str | None, fix: str
) -> RulesetError:
    return RulesetError(
        f"bad pattern at column {pos + 1}: {message}",
        source=source,
        rule=rule,
        fix=fix,
        code="pattern-error",
        detail=f"    {template}\n    {' ' * pos}^",
    )


def compile_template(template: str, *, rule: str | None = None, source: str | None = None) -> CompiledPattern:
    """Translate a key template into a full-match regex; errors point at the offending column."""
    if not template:
        raise _error(
            "empty pattern",
            template,
            0,
            rule=rule,
            source=source,
            fix="give a key template such as '**.weight'",
        )
    captures: dict[str, CaptureKind] = {}
    out = _translate(template, 0, len(template), captures, rule=rule, source=source, top=True)
    return CompiledPattern(source=template, regex=out, captures=captures)


def _translate(
    template: str,
    start: int,
    stop: int,
    captures: dict[str, CaptureKind],
    *,
    rule: str | None,
    source: str | None,
    top: bool,
) -> str:
    out: list[str] = []
    i = start
    while i < stop:
        ch = template[i]
        if template.startswith("**", i):
            out.append(_globstar(template, i, start, stop, rule=rule, source=source))
            i = min(i + 3, stop)  # a leading `**.` or a whole-template `**`
            continue
        if template.startswith(".**", i) and i + 3 <= stop and (i + 3 == stop or template[i + 3] == "."):
            if i + 3 == stop:
                # Possessive only at the very end of the template: inside {…} text may still follow.
                out.append("(?:\\.[^.]++)*+" if top and stop == len(template) else "(?:\\.[^.]++)*?")
                i = stop
            else:
                out.append("\\.(?:[^.]++\\.)*?")
                i += 4
            continue
        if ch == "*":
            whole = (i == start or template[i - 1] == ".") and (i + 1 == stop or template[i + 1] == ".")
            out.append("[^.]++" if whole else "[^.]*")
            i += 1
        elif ch == "<":
            end = template.find(">", i)
            if end < 0 or end >= stop:
                raise _error(
                    "'<' without a closing '>'", template, i, rule=rule, source=source, fix="write <name>"
                )
            if not top:
                raise _error(
                    "captures are not allowed inside {…}",
                    template,
                    i,
                    rule=rule,
                    source=source,
                    fix="move the capture out of the alternation",
                )
            name, _, kind = template[i + 1 : end].partition(":")
            kind = kind or "int"
            if not _NAME.match(name):
                raise _error(
                    f"capture name {name!r} is not an identifier",
                    template,
                    i + 1,
                    rule=rule,
                    source=source,
                    fix="use letters, digits and '_' (e.g. <expert>)",
                )
            if kind not in _CAPTURE_REGEX:
                raise _error(
                    f"unknown capture type {kind!r}",
                    template,
                    i + 2 + len(name),
                    rule=rule,
                    source=source,
                    fix="use <name> or <name:int>, <name:seg>, <name:path>",
                )
            if name in captures:
                raise _error(
                    f"capture {name!r} appears twice",
                    template,
                    i + 1,
                    rule=rule,
                    source=source,
                    fix="give each capture its own name",
                )
            captures[name] = kind  # type: ignore[assignment]
            out.append(f"(?P<{name}>{_CAPTURE_REGEX[kind]})")
            i = end + 1
        elif ch == "{":
            end = template.find("}", i)
            if end < 0 or end >= stop:
                raise _error(
                    "'{' without a closing '}'", template, i, rule=rule, source=source, fix="write {a,b}"
                )
            if "{" in template[i + 1 : end]:
                raise _error(
                    "nested '{'",
                    template,
                    template.index("{", i + 1),
                    rule=rule,
                    source=source,
                    fix="flatten the alternation",
                )
            options, pos = [], i + 1
            for piece in template[i + 1 : end].split(","):
                options.append(
                    _translate(template, pos, pos + len(piece), captures, rule=rule, source=source, top=False)
                )
                pos += len(piece) + 1
            out.append("(?:" + "|".join(options) + ")")
            i = end + 1
        elif ch in ">}":
            raise _error(
                f"unmatched {ch!r}", template, i, rule=rule, source=source, fix="remove it or open it first"
            )
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def _globstar(template: str, i: int, start: int, stop: int, *, rule: str | None, source: str | None) -> str:
    """`**` at the start of a (sub)pattern; `.**` elsewhere is handled by the caller with its dot."""
    after = i + 2
    if i != start or not (after == stop or template[after] == "."):
        raise _error(
            "'**' must be a whole segment",
            template,
            i,
            rule=rule,
            source=source,
            fix="write '**' between dots, e.g. '**.weight' or 'layers.**'",
        )
    return ".*" if after == stop else "(?:[^.]++\\.)*?"


def compile_raw_regex(pattern: str, *, rule: str | None = None, source: str | None = None) -> CompiledPattern:
    """Check a raw full-match regex and list its named groups as text captures (digit-only groups as ints)."""
    try:
        compiled = _regex.compile(pattern)
    except _regex.error as error:
        pos: int = getattr(error, "pos", None) or 0
        raise _error(
            str(getattr(error, "msg", error)),
            pattern,
            pos,
            rule=rule,
            source=source,
            fix="fix the regular expression",
        ) from None
    if re.search(r"(?<!\\)\\[1-9]", pattern):
        raise _error(
            "numbered backreferences are not supported",
            pattern,
            re.search(r"(?<!\\)\\[1-9]", pattern).start(),  # type: ignore[union-attr]
            rule=rule,
            source=source,
            fix="use a named group and (?P=name)",
        )
    captures: dict[str, CaptureKind] = {}
    for name in compiled.groupindex:
        if name.startswith("_"):
            raise _error(
                f"group name {name!r} starts with '_'",
                pattern,
                pattern.find(name),
                rule=rule,
                source=source,
                fix="names starting with '_' are reserved",
            )
        digits = re.search(rf"\(\?P?<{re.escape(name)}>(\[0-9\]|\\d)\+\+?\)", pattern) is not None
        captures[name] = "int" if digits else "seg"
    return CompiledPattern(source=pattern, regex=pattern, captures=captures)
