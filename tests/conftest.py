"""Shared test helpers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "data"

# The fixture generator needs transformers and peft, which the test environment does not install.
collect_ignore = ["fixtures/make_fixtures.py"]


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES
