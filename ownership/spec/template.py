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
import re._constants as _sre  # type: ignore[import-not-found]
import re._parser as _sre_parser  # type: ignore[import-not-found]
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ownership import limits
from ownership.errors import RulesetError

__all__ = ["CaptureKind", "CompiledPattern", "backtracking_risk", "compile_raw_regex", "compile_template"]

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
    """Translate a key template into a full-match regex that matches in time linear in the key's length; errors
    point at the offending column.

    A backtracking engine spends more than linear time only where it can retry: at a `**` or `<name:path>` (a
    gap) whose placement a later part of the pattern rejects. So each gap that another gap follows is compiled
    atomically together with the fixed run of segments after it (`(?>gap block)`): the leftmost placement of a
    fixed block is the one the lazy gap would keep, and when any placement lets the rest of the key match, the
    leftmost does too (the next gap takes up the difference). Only the last gap is left to retry, against a block
    anchored at the key's end. A gap followed by a block of varying length (`{a.b,}`) and then another gap has no
    such leftmost placement: such templates are refused, as is more than one `*` inside one segment.
    """
    if not template:
        raise _error(
            "empty pattern",
            template,
            0,
            rule=rule,
            source=source,
            fix="give a key template such as '**.weight'",
        )
    if len(template) > limits.MAX_TEMPLATE_LENGTH:
        raise limits.over_limit(
            "the template",
            name="MAX_TEMPLATE_LENGTH",
            found=f"{len(template):,} characters",
            error=RulesetError,
            source=source,
            rule=rule,
            fix="shorten the template or split the rule",
        )
    ways = 1
    for options in re.findall(r"\{([^{}]*)\}", template):
        ways *= options.count(",") + 1
    if ways > limits.MAX_TEMPLATE_ALTERNATIVES:
        raise limits.over_limit(
            "the alternatives of the template",
            name="MAX_TEMPLATE_ALTERNATIVES",
            found=f"{ways:,} ways through its {{…}}",
            error=RulesetError,
            source=source,
            rule=rule,
            fix="split the rule, or merge alternatives with '*'",
        )
    captures: dict[str, CaptureKind] = {}
    pieces: list[_Piece] = []
    _translate(template, 0, len(template), captures, rule=rule, source=source, top=True, pieces=pieces)
    return CompiledPattern(
        source=template, regex=_assemble(pieces, template, rule=rule, source=source), captures=captures
    )


@dataclass(frozen=True, slots=True)
class _Piece:
    """A run of a top-level template as regex: a gap, the final `.**`, or text matching `dots` dots (None: it
    varies)."""

    regex: str
    kind: Literal["gap", "final", "text"]
    dots: int | None = 0
    at: int = 0


def _assemble(pieces: list[_Piece], template: str, *, rule: str | None, source: str | None) -> str:
    """The pattern of a template's pieces, each gap that another gap follows made atomic with its block."""
    gaps = [i for i, piece in enumerate(pieces) if piece.kind == "gap"]
    out: list[str] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        later = [g for g in gaps if g > i]
        if piece.kind != "gap" or not later:
            out.append(piece.regex)
            i += 1
            continue
        block = pieces[i + 1 : later[0]]
        if any(part.dots is None for part in block):
            variable = next(part for part in block if part.dots is None)
            raise _error(
                "a block of varying length between two gaps ('**' or <name:path>) can match a key in too many "
                "ways",
                template,
                variable.at,
                rule=rule,
                source=source,
                fix="give the alternatives the same number of dots, or split the rule in two",
            )
        out.append("(?>" + piece.regex + "".join(part.regex for part in block) + ")")
        i = later[0]
    return "".join(out)


def _translate(
    template: str,
    start: int,
    stop: int,
    captures: dict[str, CaptureKind],
    *,
    rule: str | None,
    source: str | None,
    top: bool,
    pieces: list[_Piece] | None = None,
) -> str:
    out: list[str] = []
    dots: int | None = 0
    stars = 0  # partial-segment `*` in the current segment

    def flush() -> None:
        nonlocal dots
        if pieces is not None and out:
            pieces.append(_Piece("".join(out), "text", dots, at))
        out.clear()
        dots = 0

    def emit(regex: str, kind: Literal["gap", "final"]) -> None:
        flush()
        if pieces is not None:
            pieces.append(_Piece(regex, kind, at=i))
        else:
            out.append(regex)

    i = start
    at = start
    while i < stop:
        ch = template[i]
        if not out:
            at = i
        if template.startswith("**", i):
            if not top:
                raise _error(
                    "'**' is not allowed inside {…}",
                    template,
                    i,
                    rule=rule,
                    source=source,
                    fix="write the alternatives as rules of their own, or move '**' out of the braces",
                )
            globstar = _globstar(template, i, start, stop, rule=rule, source=source)
            emit(globstar, "final" if globstar == ".*" else "gap")
            i = min(i + 3, stop)  # a leading `**.` or a whole-template `**`
            stars = 0
            continue
        if template.startswith(".**", i) and i + 3 <= stop and (i + 3 == stop or template[i + 3] == "."):
            if not top:
                raise _error(
                    "'**' is not allowed inside {…}",
                    template,
                    i + 1,
                    rule=rule,
                    source=source,
                    fix="write the alternatives as rules of their own, or move '**' out of the braces",
                )
            if i + 3 == stop:
                # Possessive at the very end of the template: it always matches what is left, whole segments.
                emit("(?:\\.[^.]++)*+", "final")
                i = stop
            else:
                emit("\\.(?:[^.]++\\.)*?", "gap")
                i += 4
            stars = 0
            continue
        if ch == "*":
            whole = (i == start or template[i - 1] == ".") and (i + 1 == stop or template[i + 1] == ".")
            if not whole:
                stars += 1
                if stars > 1:
                    raise _error(
                        "a second '*' inside one segment",
                        template,
                        i,
                        rule=rule,
                        source=source,
                        fix="keep one '*' per segment (each can match so many ways that a long key stalls)",
                    )
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
            regex = f"(?P<{name}>{_CAPTURE_REGEX[kind]})"
            if kind == "path":
                emit(regex, "gap")
            else:
                out.append(regex)
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
            pieces_text = template[i + 1 : end].split(",")
            for piece in pieces_text:
                options.append(
                    _translate(template, pos, pos + len(piece), captures, rule=rule, source=source, top=False)
                )
                pos += len(piece) + 1
            counts = {piece.count(".") for piece in pieces_text}
            if dots is not None:
                dots = dots + counts.pop() if len(counts) == 1 else None
            out.append("(?:" + "|".join(options) + ")")
            i = end + 1
        elif ch in ">}":
            raise _error(
                f"unmatched {ch!r}", template, i, rule=rule, source=source, fix="remove it or open it first"
            )
        else:
            if ch == ".":
                stars = 0
                if dots is not None:
                    dots += 1
            out.append(re.escape(ch))
            i += 1
    if pieces is None:
        return "".join(out)
    flush()
    return ""


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
    """Check a raw full-match regex and list its named groups as text captures (digit-only groups as ints).

    A regex that could take more than linear time on a hostile key (`backtracking_risk`) is refused.
    """
    if len(pattern) > limits.MAX_TEMPLATE_LENGTH:
        raise limits.over_limit(
            "the regex",
            name="MAX_TEMPLATE_LENGTH",
            found=f"{len(pattern):,} characters",
            error=RulesetError,
            source=source,
            rule=rule,
            fix="shorten the regex or split the rule",
        )
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
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
    risk = backtracking_risk(pattern)
    if risk is not None:
        raise RulesetError(
            f"raw regex {risk}",
            source=source,
            rule=rule,
            fix="make the inner quantifier possessive (x++) or the group atomic ((?>...)), or use a template",
            code="backtracking-risk",
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


def backtracking_risk(pattern: str) -> str | None:
    """Why a raw regex could take more than linear time on a hostile key, or None when it cannot.

    The test is conservative. A repeat may make the engine retry only where it can stop at more than one place:
    a repeat of one character class is deterministic when what follows it is a literal it cannot match (or the
    end), and possessive repeats and atomic groups never retry. Everything else that repeats is *ambiguous*, and
    each scope (the pattern, an atomic group, a possessive repeat, a lookaround) may hold one ambiguous repeat at
    most: two in one scope retry each other (polynomial time), and an ambiguous repeat or an alternation inside
    a repeat can retry in exponentially many ways.

    Example:
        >>> backtracking_risk(r"(?:[^.]+\\.)*weight") is None, backtracking_risk(r"(?:a|aa)+b")
        (True, "can backtrack exponentially: an alternation inside the repeat '(?:a|aa)+'")
    """
    try:
        tree = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return "cannot be shown to run in linear time: its syntax is not Python's re syntax"
    try:
        _scope(list(tree), follow=_END, pattern=pattern)
    except _RiskError as risk:
        return str(risk)
    return None


class _RiskError(Exception):
    pass


_END = object()
_UNKNOWN = object()
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT}
_SCOPES = {_sre.POSSESSIVE_REPEAT, _sre.ATOMIC_GROUP, _sre.ASSERT, _sre.ASSERT_NOT}
_CHAR_OPS = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.IN, _sre.ANY}


def _scope(items: list[Any], *, follow: object, pattern: str) -> None:
    """Check one scope: at most one ambiguous repeat in it, and no scope inside it broken."""
    if _sequence(items, follow=follow, pattern=pattern) > 1:
        raise _RiskError(
            "can take more than linear time: several repeats that can each stop in many places, one after "
            "another (the engine retries every split between them)"
        )


def _sequence(items: list[Any], *, follow: object, pattern: str) -> int:
    """The ambiguous repeats of a sequence in the current scope; checks the scopes nested in it."""
    count = 0
    for k, (op, av) in enumerate(items):
        after = items[k + 1] if k + 1 < len(items) else follow
        if op in _REPEATS:
            _, high, body = av
            body = list(body)
            if high == 1 or (high != _sre.MAXREPEAT and high <= 4):
                count += _sequence(body, follow=after, pattern=pattern)
                continue
            if len(body) == 1 and body[0][0] in _CHAR_OPS:
                if not _disjoint(body[0], _first(after)):
                    count += _ambiguous(after, pattern)
                continue
            if any(inner in {_sre.BRANCH} for inner, _ in _walk(body)):
                raise _RiskError(
                    f"can backtrack exponentially: an alternation inside the repeat {_shown(pattern)}"
                )
            try:
                nested = _sequence(body, follow=_UNKNOWN, pattern=pattern)
            except _RiskError:
                nested = 1
            if nested:
                raise _RiskError(f"can backtrack exponentially: nested quantifier {_shown(pattern)}")
            count += _ambiguous(after, pattern)
        elif op in _SCOPES:
            body = (
                av[2]
                if op == _sre.POSSESSIVE_REPEAT
                else av[1]
                if op in (_sre.ASSERT, _sre.ASSERT_NOT)
                else av
            )
            _scope(list(body), follow=_UNKNOWN, pattern=pattern)
        elif op == _sre.SUBPATTERN:
            count += _sequence(list(av[3]), follow=after, pattern=pattern)
        elif op == _sre.BRANCH:
            count += max(
                (_sequence(list(branch), follow=after, pattern=pattern) for branch in av[1]), default=0
            )
        elif op == _sre.GROUPREF_EXISTS:
            count += max(_sequence(list(part), follow=after, pattern=pattern) for part in av[1:] if part)
    return count


def _ambiguous(after: object, pattern: str) -> int:
    """One ambiguous repeat, unless what follows it could take long to fail at each place it stops."""
    first = _first(after)
    if first is not _END and not (isinstance(first, tuple) and first[0] == _sre.LITERAL):
        raise _RiskError(
            "can take more than linear time: a repeat that can stop in many places, followed by more than a "
            f"literal character ({_shown(pattern)})"
        )
    return 1


def _first(after: object) -> object:
    """The first node of what follows, through groups."""
    while isinstance(after, tuple) and after[0] == _sre.SUBPATTERN and after[1][3]:
        after = next(iter(after[1][3]))
    return after


def _walk(items: list[Any]) -> Iterator[tuple[Any, Any]]:
    """Every node of a parsed sequence, nested ones included."""
    for op, av in items:
        yield op, av
        if op in _REPEATS or op == _sre.POSSESSIVE_REPEAT:
            yield from _walk(list(av[2]))
        elif op == _sre.SUBPATTERN:
            yield from _walk(list(av[3]))
        elif op == _sre.BRANCH:
            for branch in av[1]:
                yield from _walk(list(branch))
        elif op == _sre.ATOMIC_GROUP:
            yield from _walk(list(av))
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            yield from _walk(list(av[1]))


def _disjoint(char: tuple[Any, Any], after: object) -> bool:
    """Whether a repeated character matcher can never match what follows it (so it stops in one place)."""
    if after is _END:
        return True
    if not isinstance(after, tuple) or after[0] != _sre.LITERAL:
        return False
    return not _matches(char, after[1])


def _matches(char: tuple[Any, Any], code: int) -> bool:
    op, av = char
    if op == _sre.LITERAL:
        return bool(av == code)
    if op == _sre.NOT_LITERAL:
        return bool(av != code)
    if op == _sre.ANY:
        return code != ord("\n")
    negate, found = False, False
    for item, value in av:
        if item == _sre.NEGATE:
            negate = True
        elif item == _sre.LITERAL:
            found = found or value == code
        elif item == _sre.RANGE:
            found = found or value[0] <= code <= value[1]
        else:
            # A category (\d, \w, \s, their negations) or anything rarer: ask the engine.
            found = found or _category(value, code)
    return found != negate


def _category(category: Any, code: int) -> bool:
    names = {
        _sre.CATEGORY_DIGIT: r"\d",
        _sre.CATEGORY_NOT_DIGIT: r"\D",
        _sre.CATEGORY_WORD: r"\w",
        _sre.CATEGORY_NOT_WORD: r"\W",
        _sre.CATEGORY_SPACE: r"\s",
        _sre.CATEGORY_NOT_SPACE: r"\S",
    }
    regex = names.get(category)
    # An unknown class: assume it matches (the repeat then counts as ambiguous).
    return regex is None or re.fullmatch(regex, chr(code)) is not None


def _shown(pattern: str) -> str:
    """The first repeated group of a pattern, as written, for messages (else the whole pattern, cut)."""
    group = _REPEATED_GROUP.search(pattern)
    text = group.group(0) if group else pattern
    return repr(text if len(text) <= 60 else text[:57] + "...")


# A repeated group (not atomic), innermost: (body)+, (body)*, (body){n,}.
_REPEATED_GROUP = re.compile(r"\((?!\?>)(?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,\d*\})\??(?![+])")
