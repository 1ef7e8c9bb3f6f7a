"""Loading: entries x deciders to a plan, and a plan to the tensors a rank owns, reading only its bytes.

`plan(ruleset, source, ...)` decides one rank's (or every rank's) share from headers alone (`plan`, with its
sources in `entries`); `load(ruleset, checkpoint, ...)` reads it (`loader`), on the host or through pinned
staging onto a CUDA device (`staging`).

Example:
    >>> from ownership.loading import plan
    >>> plan("vllm-ep-lora", ["m.experts.3.w.lora_A.weight"], mesh="ep=2", rank=1, params={"num_experts": 4}).index
    [0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ownership.loading.entries import EntryLike, KeyEntry, entries_from
from ownership.loading.plan import MeshPlan, Plan, PlanBuilder, plan

if TYPE_CHECKING:
    from ownership.loading.loader import LoadResult, LoadStats, iter_load, load

__all__ = [
    "EntryLike",
    "KeyEntry",
    "LoadResult",
    "LoadStats",
    "MeshPlan",
    "Plan",
    "PlanBuilder",
    "entries_from",
    "iter_load",
    "load",
    "plan",
]

# The loader needs torch; planning does not, so it is imported when asked for.
_LOADER = {"LoadResult", "LoadStats", "iter_load", "load"}


def __getattr__(name: str) -> object:
    if name in _LOADER:
        from ownership.loading import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'ownership.loading' has no attribute {name!r}")
