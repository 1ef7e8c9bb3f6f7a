"""ownership: declarative rules for which part of a checkpoint each rank owns, and loading exactly that.

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

# torch warns at import when numpy is absent; the library never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from ownership.compile import BoundRuleset, RankRules  # noqa: E402
from ownership.decision import Decision  # noqa: E402
from ownership.errors import (  # noqa: E402
    CheckpointError,
    DecisionError,
    MeshError,
    OwnershipError,
    RulesetError,
)
from ownership.mesh import Mesh  # noqa: E402
from ownership.plan import MeshPlan, Plan  # noqa: E402
from ownership.ruleset import Ruleset, load_ruleset  # noqa: E402

__all__ = [
    "BoundRuleset",
    "CheckpointError",
    "Decision",
    "DecisionError",
    "LoadResult",
    "Mesh",
    "MeshError",
    "MeshPlan",
    "OwnershipError",
    "Plan",
    "RankRules",
    "Ruleset",
    "RulesetError",
    "load",
    "load_ruleset",
    "open_checkpoint",
]

# The loader imports torch; `import ownership` stays light until it is used. (The linter is `ownership.lint.lint`:
# a package attribute cannot be both the subpackage and its function.)
_LAZY = {
    "load": ("ownership.loader", "load"),
    "LoadResult": ("ownership.loader", "LoadResult"),
    "open_checkpoint": ("ownership.formats", "open_checkpoint"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'ownership' has no attribute {name!r}")


__version__ = "0.1.0"
