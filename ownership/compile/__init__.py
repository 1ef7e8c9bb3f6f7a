"""The compiler: a ruleset's program, params and a mesh to deciders, pure and without I/O.

`bind` resolves every size and strategy once; `BoundRuleset.for_rank(rank)` decides keys for one rank,
`BoundRuleset.owners(key, shape)` for every rank at once from the strategies' inverses.

Example:
    >>> from ownership import load_ruleset
    >>> bound = load_ruleset("vllm-ep-lora").bind(mesh="ep=4", params={"num_experts": 10})
    >>> isinstance(bound, BoundRuleset), bound.for_rank(1).decide("m.experts.3.w.lora_A.weight").owned
    (True, True)
"""

from __future__ import annotations

from ownership.compile.bind import BoundRule, BoundRuleset, bind
from ownership.compile.owners import Owner
from ownership.compile.rank import RankRules

__all__ = ["BoundRule", "BoundRuleset", "Owner", "RankRules", "bind"]
