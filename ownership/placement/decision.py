"""Decisions: what one rank does with one checkpoint entry.

A decision is either not owned, or owned with a local key and a selection per dim (see
`ownership.placement.selection`). It always names the rule that decided (`<default>` for the ruleset's default); an owned decision also carries
the captures of the match.

Example:
    >>> d = Decision("x.experts.3.w", owned=True, rule="routed", local_key="x.experts.1.w", captures={"expert": 3})
    >>> d.to_json()
    {'key': 'x.experts.3.w', 'local_key': 'x.experts.1.w', 'rule': 'routed', 'selection': None}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ownership.placement.selection import Selection, selection_to_json

__all__ = ["DEFAULT_RULE", "NO_CAPTURES", "Decision"]

DEFAULT_RULE = "<default>"
NO_CAPTURES: Mapping[str, int | str] = {}


class Decision(NamedTuple):
    """One rank's decision for one key. A tuple, because a plan makes one per key and rank."""

    key: str
    owned: bool
    rule: str
    local_key: str | None = None
    captures: Mapping[str, int | str] = NO_CAPTURES
    selection: Selection = None

    def to_json(self) -> dict[str, Any]:
        """The plan's JSON item for an owned key."""
        return {
            "key": self.key,
            "local_key": self.local_key,
            "rule": self.rule,
            "selection": selection_to_json(self.selection),
        }
