"""The floor plan holds: every module imports only from its own folder or from layers below it.

The layers, lowest first, are those of docs/architecture.md. Every import counts, at any depth of a module
(functions and `TYPE_CHECKING` blocks too), except the one exception listed below with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "ownership"

# Lowest first. Names are dotted module prefixes; the edges share a layer and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("ownership.errors", "ownership.gcpause", "ownership.limits", "ownership.units", "ownership.version"),
    ("ownership.spec",),
    ("ownership.placement",),
    ("ownership.compile",),
    ("ownership.ruleset",),
    ("ownership.formats",),
    ("ownership.loading",),
    ("ownership.lint",),
    ("ownership.torch_distributed", "ownership.cli"),
    ("ownership", "ownership.__main__", "ownership.loader", "ownership.distributed"),
]

# (importer, imported): why an import may go up.
EXCEPTIONS = {
    ("ownership.ruleset", "ownership.loading.plan"): "Ruleset.plan, the method users expect on a ruleset, "
    "hands over to ownership.loading.plan.plan (imported when called)",
}


def _unit(module: str) -> tuple[int, str]:
    """The layer of a module and the unit (folder or top-level module) it belongs to."""
    best: tuple[int, str] | None = None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (
                best is None or len(name) > len(best[1])
            ):
                best = (level, name)
    assert best is not None, f"{module} is on no layer: add it to LAYERS"
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, text: str | None = None) -> list[tuple[str, int]]:
    source = path.read_text(encoding="utf-8") if text is None else text
    tree = ast.parse(source, filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            if node.module == "ownership":
                # `from ownership import limits` imports the module ownership.limits.
                found.extend((f"ownership.{alias.name}", node.lineno) for alias in node.names)
            else:
                found.append((node.module, node.lineno))
    return [(name, line) for name, line in found if name == "ownership" or name.startswith("ownership.")]


def violations(planted: dict[Path, str] | None = None) -> list[str]:
    """Every upward import of the package, with `planted` modules (path -> source) added to it."""
    out = []
    sources: dict[Path, str | None] = {path: None for path in sorted(PACKAGE.rglob("*.py"))}
    sources.update(planted or {})
    for path, text in sources.items():
        importer = _module_name(path)
        level, unit = _unit(importer)
        for imported, line in _imports(path, text):
            other_level, other_unit = _unit(imported)
            if (importer, imported) in EXCEPTIONS:
                continue
            # The base modules of layer 0 may use each other; the units of any other layer may not.
            if other_level > level or (other_level == level and other_unit != unit and level != 0):
                out.append(f"{path.relative_to(ROOT)}:{line}: {importer} (layer {level}) imports {imported}")
    return out


def test_every_import_goes_down_or_stays_in_its_folder() -> None:
    assert violations() == []


def test_the_check_catches_an_upward_or_sideways_import() -> None:
    planted = {
        PACKAGE / "placement" / "planted.py": "from ownership.loading.loader import load\n",
        PACKAGE / "cli" / "planted.py": "def f():\n    import ownership.torch_distributed.load\n",
    }
    assert violations(planted) == [
        "ownership/placement/planted.py:1: ownership.placement.planted (layer 2) imports ownership.loading.loader",
        "ownership/cli/planted.py:2: ownership.cli.planted (layer 8) imports ownership.torch_distributed.load",
    ]


def test_every_exception_is_still_needed() -> None:
    for importer, imported in EXCEPTIONS:
        path = PACKAGE / Path(*importer.split(".")[1:]).with_suffix(".py")
        assert imported in {name for name, _ in _imports(path)}, (importer, imported)
