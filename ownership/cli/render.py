"""Output for people and machines: tables (with `rich`), JSON, byte counts, and the text forms of plans,
explanations and case reports.

Example:
    >>> coords_text({"pp": 1, "ep": 3})
    'pp=1,ep=3'
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ownership.compile.bind import BoundRuleset
from ownership.loading.entries import EntryLike, entry_nbytes
from ownership.loading.plan import MeshPlan, Padding, Plan
from ownership.placement.decision import DEFAULT_RULE, Decision
from ownership.placement.selection import runs_from_indices, selection_text
from ownership.ruleset import Explanation
from ownership.units import human_bytes

if TYPE_CHECKING:
    from ownership.lint.cases import CaseReport

__all__ = [
    "coords_text",
    "print_case_report",
    "print_explanation",
    "print_json",
    "print_mesh_plan",
    "print_rank_plan",
    "print_table",
]


def print_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    align_right: set[int] | None = None,
    shrink: Mapping[int, str] | None = None,
    wide: bool = False,
) -> None:
    """A plain table on stdout, sized to the terminal (its width, or `COLUMNS` when piped; unlimited when piped
    without it), with no trailing spaces.

    Columns in `shrink` give way when the table is too wide, widest first: `"middle"` cuts a cell from the middle
    (keys keep their start and their end), `"end"` from the end. `wide` never cuts.

    Example:
        >>> import os; os.environ["COLUMNS"] = "30"
        >>> print_table(["key", "bytes"], [["model.layers.0.mlp.experts.3.w", "1.0 KiB"]], align_right={1},
        ...             shrink={0: "middle"})
        key                      bytes
        model.laye…xperts.3.w  1.0 KiB
        >>> del os.environ["COLUMNS"]
    """
    table = [list(header), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    limit = None if wide else _terminal_width()
    shrink = shrink or {}
    if limit is not None:
        excess = sum(widths) + 2 * (len(widths) - 1) - limit
        while excess > 0:
            shrinkable = [i for i in shrink if widths[i] > max(_MIN_WIDTH, len(header[i]))]
            if not shrinkable:
                break
            i = max(shrinkable, key=lambda j: widths[j])
            cut = min(excess, widths[i] - max(_MIN_WIDTH, len(header[i])))
            widths[i] -= cut
            excess -= cut
    right = align_right or set()
    for row in table:
        cells = []
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                cell = _cut(cell, widths[i], middle=shrink.get(i) == "middle")
            cells.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        print("  ".join(cells).rstrip())


_MIN_WIDTH = 12


def _terminal_width() -> int | None:
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def _cut(text: str, width: int, *, middle: bool) -> str:
    """`text` in `width` characters, an ellipsis where it was cut."""
    if width <= 1:
        return text[:width]
    if not middle:
        return text[: width - 1] + "…"
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def coords_text(coords: Mapping[str, int]) -> str:
    """Coordinates (or axis sizes) as `ep=3,tp=1`."""
    return ",".join(f"{axis}={value}" for axis, value in coords.items())


def print_explanation(found: Explanation, *, rank: int | None, wide: bool = False) -> None:
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
        shrink={2: "middle", 3: "end"},
        wide=wide,
    )


def print_rank_plan(plan: Plan, name: str, *, wide: bool = False) -> None:
    """One rank's plan: a row per owned key, then the bytes owned."""
    rows = [_owned_row(entry, decision) for entry, decision in plan.owned_entries()]
    print(
        f"{name}: rank {plan.rank} ({coords_text(plan.coords)}) owns {len(plan.owned)} of {len(plan.entries)} keys"
    )
    print_table(
        ["key", "local key", "rule", "selection", "bytes"],
        rows,
        align_right={4},
        shrink={0: "middle", 1: "middle", 3: "end"},
        wide=wide,
    )
    total = plan.bytes_total
    if total:
        print(
            f"bytes owned {human_bytes(plan.bytes_owned)} of {human_bytes(total)} "
            f"({100 * plan.bytes_owned / total:.1f}%)"
        )
    print_padding(plan.padding)


def print_padding(padding: Sequence[Padding], *, rank: int | None = None) -> None:
    """A line per padded tensor: the rows read and the padding vLLM adds."""
    where = "" if rank is None else f" on rank {rank}"
    for pad in padding:
        print(
            f"padded{where}: {pad.key} dim {pad.dim}: reads {pad.rows:,} rows of {pad.padded_rows:,} "
            f"({pad.padded_rows - pad.rows:,} rows of padding, as vLLM pads the vocab)"
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


def print_mesh_plan(plan: MeshPlan, name: str, *, bound: BoundRuleset | None = None) -> None:
    """Every rank's plan: a row per rank with its keys, bytes and share of what all ranks load (so the shares add
    up to 100%), and the experts it holds where a rule places experts (`bound` resolves fused expert dims)."""
    loaded = sum(rank_plan.bytes_owned for rank_plan in plan.ranks)
    experts = [expert_ids(rank_plan, bound) for rank_plan in plan.ranks]
    header = ["rank", "coords", "keys", "bytes", "share"] + (["experts"] if any(experts) else [])
    rows = []
    for rank_plan, ids in zip(plan.ranks, experts, strict=True):
        rows.append(
            [
                str(rank_plan.rank),
                coords_text(rank_plan.coords),
                str(len(rank_plan.owned)),
                human_bytes(rank_plan.bytes_owned) if loaded else "",
                f"{100 * rank_plan.bytes_owned / loaded:.1f}%" if loaded else "",
                *([ids_text(ids)] if any(experts) else []),
            ]
        )
    num_keys = len(plan.ranks[0].entries) if plan.ranks else 0
    print(
        f"{name}: {num_keys} keys over {len(plan.ranks)} ranks ({coords_text(plan.mesh)}), ruleset {plan.ruleset}"
    )
    print_table(header, rows, align_right={2, 3, 4}, shrink={5: "end"})
    total = plan.bytes_total
    if total:
        print(
            f"checkpoint {human_bytes(total)}; all ranks load {human_bytes(loaded)} "
            f"({loaded / total:.2f}x the checkpoint)"
        )
    for rank_plan in plan.ranks:
        print_padding(rank_plan.padding, rank=rank_plan.rank)


def expert_ids(plan: Plan, bound: BoundRuleset | None) -> list[int]:
    """The experts a rank holds: captured from its keys (`<expert>`), or, given `bound`, the `expert` ids of the
    fused tensors' layouts it holds part of."""
    ids: set[int] = set()
    rules = bound.by_id if bound is not None else {}
    for entry, decision in plan.owned_entries():
        value = decision.captures.get("expert")
        if isinstance(value, int):
            ids.add(value)
        rule = rules.get(decision.rule)
        if rule is None or entry.shape is None or not any(dim.name == "expert" for dim in rule.dims):
            continue
        for dim, (_, _, strategy) in zip(rule.dims, rule.dim_strategies(entry.shape, entry.key), strict=True):
            if dim.name == "expert":
                ids.update(strategy.owned(rule.mesh.coord(plan.coords, dim.axis)))
    return sorted(ids)


def ids_text(ids: Sequence[int]) -> str:
    """Sorted ids as runs: `0-15`, `3`, `0-124 step 4`, joined by commas.

    Example:
        >>> ids_text([0, 1, 2, 3, 9]), ids_text(list(range(2, 64, 4)))
        ('0-3,9', '2-62 step 4')
    """
    parts = []
    for start, stop, step in runs_from_indices(ids):
        last = start + (len(range(start, stop, step)) - 1) * step
        parts.append(
            str(start) if last == start else f"{start}-{last}" + (f" step {step}" if step > 1 else "")
        )
    return ",".join(parts)


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
