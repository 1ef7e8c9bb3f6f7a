"""The exported surface, pinned: what each public package offers by name, every module's `__all__` real, and the
deprecated import paths still working, with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from tests.conftest import ROOT

PUBLIC = {
    "ownership": [
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
    ],
    "ownership.errors": [
        "CheckpointError",
        "DecisionError",
        "IntegrityError",
        "MeshError",
        "OutputError",
        "OwnershipError",
        "RulesetError",
        "did_you_mean",
        "one_of",
        "short",
    ],
    "ownership.spec": [
        "ParamSpec",
        "PlacementSpec",
        "Program",
        "RuleSource",
        "RuleSpec",
        "RulesetSpec",
        "analyze",
        "builtin_names",
        "check",
        "load_ruleset_spec",
        "parse_ruleset",
        "rule_source",
        "ruleset_json_schema",
    ],
    "ownership.limits": [
        "MAX_CUT_DIM",
        "MAX_HEADER_BYTES",
        "MAX_INDEX_SIZE",
        "MAX_JSON_BYTES",
        "MAX_KEY_LENGTH",
        "MAX_RANKS",
        "MAX_RULES",
        "MAX_RULE_FILE_BYTES",
        "MAX_TEMPLATE_ALTERNATIVES",
        "MAX_TEMPLATE_LENGTH",
        "MAX_TENSOR_ELEMENTS",
        "over_limit",
        "parse_json",
    ],
    "ownership.placement": [
        "Decision",
        "DimSelection",
        "Mesh",
        "MeshLike",
        "Run",
        "Selection",
        "Strategy",
        "make_strategy",
        "to_mesh",
    ],
    "ownership.compile": ["BoundRule", "BoundRuleset", "Owner", "RankRules", "bind"],
    "ownership.ruleset": [
        "Explanation",
        "Ruleset",
        "RulesetLike",
        "detect_ruleset",
        "family_ruleset",
        "load_ruleset",
        "model_type_of",
        "resolve_ruleset",
    ],
    "ownership.formats": [
        "ByteRuns",
        "Checkpoint",
        "Entry",
        "ReadStats",
        "SafetensorsFile",
        "ShardedCheckpoint",
        "TorchFile",
        "WholeFileReadWarning",
        "open_checkpoint",
    ],
    "ownership.loading": [
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
    ],
    "ownership.lint": ["CHECKS", "Finding", "LintReport", "lint", "to_json", "to_sarif", "to_text"],
    "ownership.torch_distributed": [
        "DistributedResult",
        "IntegrityError",
        "RankSummary",
        "Replicate",
        "Shard",
        "ShardSpec",
        "checksum",
        "checksums",
        "load_distributed",
        "mesh_from_device_mesh",
        "mesh_from_env",
        "mesh_from_process_group",
        "shard_specs",
        "summarize",
        "to_dtensors",
        "verify_summaries",
    ],
    "ownership.cli": ["main"],
}

DEPRECATED = {
    "ownership.loader": "ownership.loading.loader",
    "ownership.distributed": "ownership.torch_distributed",
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_surface(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ == PUBLIC[name]
    assert all(getattr(module, attribute) is not None for attribute in module.__all__)


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "ownership").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name not in DEPRECATED and name != "ownership.__main__":
            names.append(name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_every_module_says_what_it_exports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [attribute for attribute in exported if not hasattr(module, attribute)]
    assert missing == [], name


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED.items()))
def test_deprecated_paths_still_work_and_say_where_to_go(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught)
    target = importlib.import_module(new)
    assert all(getattr(module, name) is getattr(target, name) for name in module.__all__)
