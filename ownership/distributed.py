"""Deprecated path, kept for one release: use `ownership.torch_distributed`.

`ownership.distributed` became the `ownership.torch_distributed` package (mesh, load, dtensor, verify) when the
package moved to one folder per layer.
"""

from __future__ import annotations

import warnings

from ownership.torch_distributed import (
    IntegrityError,
    RankSummary,
    checksum,
    checksums,
    load_distributed,
    mesh_from_device_mesh,
    mesh_from_env,
    mesh_from_process_group,
    summarize,
    to_dtensors,
    verify_summaries,
)

__all__ = [
    "IntegrityError",
    "RankSummary",
    "checksum",
    "checksums",
    "load_distributed",
    "mesh_from_device_mesh",
    "mesh_from_env",
    "mesh_from_process_group",
    "summarize",
    "to_dtensors",
    "verify_summaries",
]

warnings.warn(
    "ownership.distributed is deprecated and will be removed in the next release: import from "
    "ownership.torch_distributed",
    DeprecationWarning,
    stacklevel=2,
)
