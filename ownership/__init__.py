"""ownership: declarative rules for which part of a checkpoint each rank owns, and loading exactly that.

The public face. The layers below it, lowest first (docs/architecture.md): `spec` (the rule language),
`placement` (who owns what, as arithmetic), `compile` (rules to deciders), the `Ruleset` facade, `formats`
(checkpoint back-ends), `load` (plans and reads), `lint`, and the edges `torch_distributed` and `cli`.

Example:
    >>> import ownership
    >>> rules = ownership.load_ruleset("vllm-ep-lora").compile(mesh="ep=2", rank=1, params={"num_experts": 128})
    >>> rules.decide("base_model.model.model.layers.0.mlp.experts.64.up_proj.lora_A.weight").owned
    True
    >>> callable(ownership.load)
    True
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

# torch warns at import when numpy is absent; the library never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from ownership.compile import BoundRuleset, RankRules  # noqa: E402
from ownership.errors import (  # noqa: E402
    CheckpointError,
    DecisionError,
    IntegrityError,
    MeshError,
    OutputError,
    OwnershipError,
    RulesetError,
)
from ownership.placement.decision import Decision  # noqa: E402
from ownership.placement.mesh import Mesh  # noqa: E402
from ownership.ruleset import Explanation, Ruleset, load_ruleset  # noqa: E402
from ownership.version import __version__ as __version__  # noqa: E402

if TYPE_CHECKING:
    from ownership.formats.detect import open_checkpoint
    from ownership.loading.loader import LoadResult, load
    from ownership.loading.plan import MeshPlan, Plan, plan

__all__ = [
    "BoundRuleset",
    "CheckpointError",
    "Decision",
    "DecisionError",
    "Explanation",
    "IntegrityError",
    "LoadResult",
    "Mesh",
    "MeshError",
    "MeshPlan",
    "OutputError",
    "OwnershipError",
    "Plan",
    "RankRules",
    "Ruleset",
    "RulesetError",
    "load",
    "load_ruleset",
    "open_checkpoint",
    "plan",
]

# Reading checkpoints needs torch; `import ownership` stays light until they are used. (The linter is
# `ownership.lint.lint`: a package attribute cannot be both the subpackage and its function.)
_LAZY = {
    "load": ("ownership.loading.loader", "load"),
    "LoadResult": ("ownership.loading.loader", "LoadResult"),
    "MeshPlan": ("ownership.loading.plan", "MeshPlan"),
    "Plan": ("ownership.loading.plan", "Plan"),
    "plan": ("ownership.loading.plan", "plan"),
    "open_checkpoint": ("ownership.formats.detect", "open_checkpoint"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'ownership' has no attribute {name!r}")
