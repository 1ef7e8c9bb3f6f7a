"""docs/architecture.md names files and modules that exist, and its layer table is the one the layer test
enforces."""

from __future__ import annotations

import importlib
import re
import warnings

from tests.conftest import ROOT
from tests.test_layers import LAYERS

TEXT = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_every_file_named_exists() -> None:
    paths = set(re.findall(r"`((?:ownership|rules|tests)/[\w/.-]+\.(?:py|toml))`", TEXT))
    assert len(paths) >= 15
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []


def test_every_module_named_imports() -> None:
    modules = set(re.findall(r"`(ownership(?:\.\w+)+)", TEXT))
    assert len(modules) >= 5
    for name in sorted(modules):
        parts = name.split(".")
        # `ownership.loading.plan.plan` names a function: import the longest module prefix, then look it up.
        for cut in range(len(parts), 0, -1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    target: object = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
            break


def _as_written(module: str) -> str:
    """How the layer table writes a module of LAYERS: `spec/` for a folder, `errors.py` for a file."""
    relative = module.removeprefix("ownership").removeprefix(".") or "__init__"
    return f"{relative}/" if (ROOT / "ownership" / relative).is_dir() else f"{relative}.py"


def test_the_layer_table_is_the_enforced_one() -> None:
    rows = re.findall(r"^\| (\d) \| (.+?) \|", TEXT, flags=re.M)
    documented = {int(level): set(re.findall(r"`([\w.]+/?)`", cells)) for level, cells in rows}
    deprecated = {"ownership.loader", "ownership.distributed"}
    enforced = {
        level: {_as_written(name) for name in names if name not in deprecated}
        for level, names in enumerate(LAYERS)
    }
    assert documented == enforced
