"""Output for people and machines: tables (with `rich`), JSON, byte counts and selections as text.

Example:
    >>> human_bytes(81 * 2**20)
    '81.0 MiB'
    >>> selection_text(((((0, 8, 1),), None)))
    '[0:8, :]'
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from ownership.selection import Run, Selection

__all__ = ["human_bytes", "print_json", "print_table", "selection_text"]


def human_bytes(num: float) -> str:
    """Bytes in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num) < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"  # pragma: no cover


def _run_text(run: Run) -> str:
    start, stop, step = run
    if stop - start == 1:
        return str(start)
    return f"{start}:{stop}" if step == 1 else f"{start}:{stop}:{step}"


def selection_text(selection: Selection) -> str:
    """A selection in slice notation: `all` for the whole tensor, `[0:8, :]`, `[:, 1:24:6+2:24:6]`."""
    if selection is None:
        return "all"
    dims = [":" if dim is None else "+".join(_run_text(run) for run in dim) for dim in selection]
    return "[" + ", ".join(dims) + "]"


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
