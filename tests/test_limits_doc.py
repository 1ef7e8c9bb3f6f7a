"""docs/limits.md lists every limit of ownership.limits, with its value."""

from __future__ import annotations

import re

from ownership import limits
from tests.conftest import ROOT

TEXT = (ROOT / "docs" / "limits.md").read_text(encoding="utf-8")


def _shown(value: int) -> set[str]:
    forms = {f"{value:,}"}
    if value >= 2**20 and value % 2**20 == 0:
        forms.add(f"{value // 2**20} MiB")
    exponent = value.bit_length() - 1
    if value == 2**exponent:
        forms.add(f"2^{exponent}")
    return forms


def test_every_limit_is_documented_with_its_value() -> None:
    rows = dict(re.findall(r"^\| `(MAX_\w+)` \| ([^|]+?) \|", TEXT, flags=re.M))
    names = [name for name in limits.__all__ if name.startswith("MAX_")]
    assert sorted(rows) == sorted(names)
    for name in names:
        assert rows[name] in _shown(getattr(limits, name)), name
