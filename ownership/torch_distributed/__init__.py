"""The `torch.distributed` edge: meshes from process groups, loading with a collective verify, and DTensors.

Example (run by every process of a job of 4):
    ```text
    dist.init_process_group("gloo")
    result = load_distributed("vllm-ep-lora", "path/to/adapter", mesh="ep=4", params={"num_experts": 6})
    ```
"""

from __future__ import annotations

from ownership.errors import IntegrityError
from ownership.torch_distributed.checksum import checksum, checksums
from ownership.torch_distributed.dtensor import Replicate, Shard, ShardSpec, shard_specs, to_dtensors
from ownership.torch_distributed.load import DistributedResult, load_distributed
from ownership.torch_distributed.mesh import mesh_from_device_mesh, mesh_from_env, mesh_from_process_group
from ownership.torch_distributed.verify import RankSummary, summarize, verify_summaries

__all__ = [
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
]
