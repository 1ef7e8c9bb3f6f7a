"""Output for people and machines: tables (with `rich`), JSON, byte counts, and the text forms of plans,
explanations and case reports.

Example:
    >>> human_bytes(81 * 2**20)
    '81.0 MiB'
    >>> coords_text({"pp": 1, "ep": 3})
    'pp=1,ep=3'
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ownership.lint.cases import CaseReport
from ownership.loading.entries import EntryLike, entry_nbytes
from ownership.loading.plan import MeshPlan, Plan
from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.selection import selection_text
from ownership.ruleset import Explanation

__all__ = [
    "coords_text",
    "human_bytes",
    "print_case_report",
    "print_explanation",
    "print_json",
    "print_mesh_plan",
    "print_rank_plan",
    "print_table",
]


def human_bytes(num: float) -> str:
    """Bytes in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"  # pragma: no cover


def print_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, align_right: set[int] | None = None
) -> None:
    """A plain table on stdout, drawn by rich with no colour when stdout is not a terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for i, name in enumerate(header):
        table.add_column(
            name, justify="right" if align_right and i in align_right else "left", overflow="fold"
        )
    for row in rows:
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False).print(table)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def coords_text(coords: Mapping[str, int]) -> str:
    """Coordinates (or axis sizes) as `ep=3,tp=1`."""
    return ",".join(f"{axis}={value}" for axis, value in coords.items())


def print_explanation(found: Explanation, *, rank: int | None) -> None:
    """`ownership explain`'s text: the rule, its captures, and a table of owners."""
    mesh = found.mesh
    print(f"key      {found.key}")
    print(f"rule     {found.rule}" + ("" if found.rule != DEFAULT_RULE else f" ({found.default})"))
    if found.captures:
        print("captures " + ", ".join(f"{k}={v}" for k, v in found.captures.items()))
    scope = f"rank {rank}" if rank is not None else f"{mesh.num_ranks} ranks of {mesh}"
    print(f"owners   {len(found.owners)} of {scope}" + ("" if found.owners else " (nobody loads it)"))
    print_table(
        ["rank", "coords", "local key", "selection"],
        [
            [str(r), coords_text(mesh.coords(r)), d.local_key or "", selection_text(d.selection)]
            for r, d in found.owners
        ],
    )


def print_rank_plan(plan: Plan, name: str) -> None:
    """One rank's plan: a row per owned key, then the bytes owned."""
    rows = [_owned_row(entry, decision) for entry, decision in plan.owned_entries()]
    print(
        f"{name}: rank {plan.rank} ({coords_text(plan.coords)}) owns {len(plan.owned)} of {len(plan.entries)} keys"
    )
    print_table(["key", "local key", "rule", "selection", "bytes"], rows, align_right={4})
    total = plan.bytes_total
    if total:
        print(
            f"bytes owned {human_bytes(plan.bytes_owned)} of {human_bytes(total)} "
            f"({100 * plan.bytes_owned / total:.1f}%)"
        )


def _owned_row(entry: EntryLike, decision: Decision) -> list[str]:
    local = "" if decision.local_key == decision.key else decision.local_key or ""
    nbytes = entry_nbytes(entry, decision)
    return [
        decision.key,
        local,
        decision.rule,
        selection_text(decision.selection),
        "" if nbytes is None else human_bytes(nbytes),
    ]


def print_mesh_plan(plan: MeshPlan, name: str) -> None:
    """Every rank's plan: a row per rank with its keys, bytes and share."""
    total = plan.bytes_total
    rows = []
    for rank_plan in plan.ranks:
        share = f"{100 * rank_plan.bytes_owned / total:.1f}%" if total else ""
        rows.append(
            [
                str(rank_plan.rank),
                coords_text(rank_plan.coords),
                str(len(rank_plan.owned)),
                human_bytes(rank_plan.bytes_owned) if total else "",
                share,
            ]
        )
    num_keys = len(plan.ranks[0].entries) if plan.ranks else 0
    print(
        f"{name}: {num_keys} keys over {len(plan.ranks)} ranks ({coords_text(plan.mesh)}), ruleset {plan.ruleset}"
    )
    print_table(["rank", "coords", "keys", "bytes", "share"], rows, align_right={2, 3, 4})
    if total:
        print(f"checkpoint {human_bytes(total)}")


def print_case_report(report: CaseReport) -> None:
    """The text report of a case file: a table of checks per rule, each failure on its own lines, then a
    summary line."""
    print_table(
        ["rule", "passed", "failed"],
        [
            [rule, str(count.passed), str(count.failed)]
            for rule, count in report.per_rule.items()
            if count != (0, 0) or rule not in report.inherited
        ],
        align_right={1, 2},
    )
    for failure in report.failures:
        print(f"FAILED {failure.case}: {failure.key}")
        print(f"  {failure.check}: expected {failure.expected}")
        print(f"  {' ' * len(failure.check)}  found    {failure.found}")
    if report.unexercised:
        print(f"rules without a check: {', '.join(report.unexercised)}")
    print(f"{report.ruleset}: {report.num_passed} passed, {report.num_failed} failed ({report.source})")
