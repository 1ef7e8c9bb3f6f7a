"""The package's version, in one place: `ownership --version`, the wheel's metadata and `ownership.__version__`."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.2.0"
