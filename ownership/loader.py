"""Deprecated path, kept for one release: use `from ownership import load` (or `ownership.loading`).

`ownership.loader` became `ownership.loading.loader` when the package moved to one folder per layer.
"""

from __future__ import annotations

import warnings

from ownership.loading.loader import LoadResult, LoadStats, iter_load, load

__all__ = ["LoadResult", "LoadStats", "iter_load", "load"]

warnings.warn(
    "ownership.loader is deprecated and will be removed in the next release: use `from ownership import load` "
    "(or ownership.loading)",
    DeprecationWarning,
    stacklevel=2,
)
