"""Static checks: what can be said of a ruleset with no checkpoint.

The rule compiler's own problems (schema, patterns, axes, params, raw regexes that could backtrack...) are
reported under their codes; this module adds the checks that need the whole ruleset: captures never used, and
patterns whose example keys earlier rules take.

Example:
    >>> from ownership.spec.program import check
    >>> from ownership.spec.schema import parse_ruleset
    >>> spec = parse_ruleset('name = "x"\\naxes = []\\n[[rule]]\\nid = "all"\\nmatch = "**"\\n[[rule]]\\nid = "w"\\nmatch = "**.weight"\\n')
    >>> [f.check for f in static_findings(*check(spec, source="x.toml"))]
    ['never-matches']
"""

from __future__ import annotations

import itertools

from ownership.errors import OwnershipError, RulesetError
from ownership.lint.finding import Finding
from ownership.spec.program import AnalyzedRule, Program

__all__ = ["example_keys", "finding_of", "static_findings"]


def static_findings(program: Program | None, problems: list[RulesetError]) -> list[Finding]:
    """Every static finding of one analysis (`ownership.spec.program.check`): the compiler's problems, or, when
    there are none, the ruleset-wide checks."""
    if program is None:
        return [finding_of(error) for error in problems]
    return [*_unused_captures(program), *_never_matches(program)]


def finding_of(error: OwnershipError) -> Finding:
    """A compiler error as a finding under its own code, with what it found and expected, and any further
    problems it lists (its detail) in the finding's data."""
    message = error.message
    if error.found is not None:
        facts = [f"found {error.found}", *([f"expected {error.expected}"] if error.expected else [])]
        message += f" ({', '.join(facts)})"
    data = {"also": error.detail.strip().splitlines()} if error.detail else {}
    return Finding(error.code or "schema", "error", message, rule=error.rule, fix=error.fix, data=data)


def _unused_captures(program: Program) -> list[Finding]:
    out = []
    for rule in program.rules:
        used = set(rule.captured) | {piece.name for piece in rule.rename or () if piece.name}
        for name in rule.pattern.captures:
            if name not in used:
                out.append(
                    Finding(
                        "unused-capture",
                        "warning",
                        f"capture {name!r} is neither placed nor used by a rename",
                        rule=rule.id,
                        fix=f"place it, use it in `rename`, or match it with * instead of <{name}>",
                    )
                )
    return out


def example_keys(template: str, *, limit: int = 16) -> list[str]:
    """A few keys a template matches: `**` as one or two segments, `*` and captures as one segment."""
    pieces: list[list[str]] = []
    i = 0
    literal = ""
    while i < len(template):
        if template.startswith("**", i):
            pieces.append([literal])
            pieces.append(["a", "a.b"])
            literal, i = "", i + 2
        elif template[i] == "*":
            whole = (i == 0 or template[i - 1] == ".") and (i + 1 == len(template) or template[i + 1] == ".")
            literal += "x" if whole else ""
            i += 1
        elif template[i] == "<":
            end = template.index(">", i)
            kind = template[i + 1 : end].partition(":")[2] or "int"
            literal += "1" if kind == "int" else "x"
            i = end + 1
        elif template[i] == "{":
            end = template.index("}", i)
            pieces.append([literal])
            pieces.append(template[i + 1 : end].split(","))
            literal, i = "", end + 1
        else:
            literal += template[i]
            i += 1
    pieces.append([literal])
    return ["".join(parts) for parts in itertools.islice(itertools.product(*pieces), limit)]


def _never_matches(program: Program) -> list[Finding]:
    out = []
    for rule in program.rules[1:]:
        if rule.spec.match is None:
            continue
        # Rules that can never be active together (their `when` conditions conflict) cannot shadow each other.
        compatible = tuple(r for r in program.rules if _compatible(r, rule))
        together = program if len(compatible) == len(program.rules) else program.subset(compatible)
        takers: set[str] = set()
        reached = False
        for key in example_keys(rule.pattern.source):
            found = together.classify(key)
            if found is None:
                continue  # a dot-joining corner of the generator; says nothing
            winner = found.rule
            if winner.index >= rule.index:
                reached = True
                break
            takers.add(winner.id)
        if not reached and takers:
            out.append(
                Finding(
                    "never-matches",
                    "warning",
                    f"every example key of its pattern is taken first by rule {', '.join(sorted(takers))}",
                    rule=rule.id,
                    fix="move this rule above the broader one, or narrow the broader pattern",
                )
            )
    return out


def _compatible(a: AnalyzedRule, b: AnalyzedRule) -> bool:
    return all(b.spec.when.get(name, value) == value for name, value in a.spec.when.items())
