"""Bytes per rank (`byte-balance`, info) and a rank far above its share (`byte-imbalance`, a warning).

A rank's ideal share is the mean over ranks of the bytes they load: what is replicated counts whole on every
rank, what is split counts once over the ranks that split it. A largest rank above 1.25x the mean names the rules
that put the most bytes on it beyond their own mean, with example keys, so the cause is one look away (an ep
rank with more experts than the others, a pipeline stage with the embeddings and more layers).

Example:
    >>> balance = Balance(num_ranks=2)
    >>> balance.note("experts", "m.experts.0.w", {0: 300})
    >>> balance.note("norm", "m.norm.w", {0: 10, 1: 10})
    >>> from ownership.lint.finding import LintReport
    >>> report = LintReport("r", "", "ep=2", 2)
    >>> balance.report(report)
    >>> [f.check for f in report.findings]
    ['byte-balance', 'byte-imbalance']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ownership.lint.finding import LintReport
from ownership.units import human_bytes

__all__ = ["IMBALANCE", "Balance"]

IMBALANCE = 1.25
"""A largest rank above this multiple of the mean is a warning."""

_EXAMPLES = 3


@dataclass
class Balance:
    """Bytes per rank, per rule, gathered key by key."""

    num_ranks: int
    per_rule: dict[str, list[int]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    everywhere: dict[str, int] = field(default_factory=dict)
    """Bytes a rule gives whole to every rank (the default's replicated keys), kept as one number."""

    def note(self, rule: str, key: str, bytes_per_rank: Mapping[int, int]) -> None:
        per_rank = self.per_rule.get(rule)
        if per_rank is None:
            per_rank = self.per_rule[rule] = [0] * self.num_ranks
            self.examples[rule] = []
        for rank, nbytes in bytes_per_rank.items():
            per_rank[rank] += nbytes
        if len(self.examples[rule]) < _EXAMPLES:
            self.examples[rule].append(key)

    def note_everywhere(self, rule: str, nbytes: int) -> None:
        self.everywhere[rule] = self.everywhere.get(rule, 0) + nbytes

    def per_rank(self) -> list[int]:
        everywhere = sum(self.everywhere.values())
        totals = [everywhere] * self.num_ranks
        for per_rank in self.per_rule.values():
            for rank, nbytes in enumerate(per_rank):
                totals[rank] += nbytes
        return totals

    def report(self, report: LintReport) -> None:
        totals = self.per_rank()
        if not any(totals):
            return
        mean = sum(totals) / len(totals)
        peak = max(totals)
        rank = totals.index(peak)
        report.add(
            "byte-balance",
            f"bytes per rank: max {human_bytes(peak)} on rank {rank}, mean {human_bytes(mean)}, "
            f"max/mean {peak / mean:.3f}",
            data={"bytes_per_rank": totals, "max_over_mean": round(peak / mean, 4)},
        )
        if peak <= IMBALANCE * mean:
            return
        excess = sorted(
            (
                (per_rank[rank] - sum(per_rank) / self.num_ranks, rule)
                for rule, per_rank in self.per_rule.items()
            ),
            reverse=True,
        )
        causes = [(extra, rule) for extra, rule in excess[:_EXAMPLES] if extra > 0]
        report.add(
            "byte-imbalance",
            f"rank {rank} holds {human_bytes(peak)}, {peak / mean:.2f}x the mean of {human_bytes(mean)}; most of "
            "the excess comes from "
            + ", ".join(f"rule {rule!r} (+{human_bytes(extra)})" for extra, rule in causes),
            rule=causes[0][1] if causes else None,
            keys=[key for _, rule in causes for key in self.examples[rule][:1]],
            fix="spread what those rules place more evenly: an axis size that divides the experts or layers, "
            "explicit pp_stage_sizes, or a table of experts per rank",
            data={"rank": rank, "max_over_mean": round(peak / mean, 4), "rules": [r for _, r in causes]},
        )
