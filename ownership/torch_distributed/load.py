"""Loading under `torch.distributed`: each process loads its share, and the job's loads are checked together.

`load_distributed(ruleset, checkpoint, mesh=...)` loads this process's share (its rank is `dist.get_rank(group)`,
its coordinates those of that rank on `mesh`). With `verify=True` it then runs one collective,
`all_gather_object` of a compact summary per rank (`ownership.torch_distributed.verify`): every rank checks the
same gathered summaries, so every rank raises `IntegrityError` or every rank returns.

With `as_dtensor=True` (and a `DeviceMesh` as `mesh`, or one built over the whole world from the mesh's axes),
tensors that are replicated or split into `torch.chunk`'s contiguous chunks over mesh axes come back as
`DTensor`s; the rest (expert partitions, strided selections) stay local tensors. `result.shards` says, per
local key, which: the global key and shape, the placements, and the global ids (experts, rows) the rank holds
(`ownership.torch_distributed.dtensor`).

Example (no process group in a doctest, so the error):
    >>> load_distributed("vllm-ep-lora", "adapter", mesh="ep=2")
    Traceback (most recent call last):
    ...
    ownership.errors.MeshError: no torch.distributed process group is initialised. Fix: call torch.distributed.init_process_group (torchrun sets RANK and WORLD_SIZE) before building the mesh
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ownership.errors import MeshError
from ownership.formats.detect import open_checkpoint
from ownership.loading.loader import LoadResult, load
from ownership.placement.mesh import Mesh, MeshLike, to_mesh
from ownership.ruleset import RulesetLike, detect_ruleset, load_ruleset
from ownership.spec.params import merge_configs
from ownership.torch_distributed.dtensor import ShardSpec, shard_specs, to_dtensors
from ownership.torch_distributed.mesh import checked_mesh, mesh_from_device_mesh, require_process_group
from ownership.torch_distributed.verify import failed_summary, integrity_error, summarize, verify_summaries

__all__ = ["DistributedResult", "load_distributed"]


@dataclass
class DistributedResult(LoadResult):
    """A `LoadResult`, with where each local tensor sits in the checkpoint's tensor."""

    shards: dict[str, ShardSpec] = field(default_factory=dict)
    """Each local key's `ShardSpec` (`ownership.torch_distributed.dtensor`); filled with `as_dtensor=True`,
    empty otherwise."""


def load_distributed(
    ruleset: RulesetLike,
    checkpoint: str | os.PathLike[str],
    *,
    mesh: MeshLike | DeviceMesh,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
    group: dist.ProcessGroup | None = None,
    as_dtensor: bool = False,
    mmap: bool = True,
    force_config: bool = False,
) -> DistributedResult:
    """Load this process's share of `checkpoint`: rank `dist.get_rank(group)` on `mesh`.

    `ruleset`, `params`, `config`, `force_config` and `dtype` are as in `ownership.load`; host tensors may be views of the file's
    pages (`mmap`, as there).

    `mesh` is an ownership mesh (`"pp=2,ep=4"`, a mapping, a `Mesh`) or a `DeviceMesh` with named dims (then
    its dims are the axes; see `mesh_from_device_mesh`). With a CUDA `device`, tensors are read straight onto
    it through pinned staging (`ownership.loading.staging`).

    With `verify`, one `all_gather_object` of per-rank summaries (selections and 64-bit checksums, not
    tensors) lets every rank check the whole job; every rank then raises the same `IntegrityError`, or none
    does. A rank whose own load fails raises its own error after the collective, so that no rank waits
    forever; the others raise `IntegrityError` naming it. Under NCCL, set the current CUDA device first
    (`all_gather_object` needs it). Checksums are taken on `device`, where the tensors are.

    With `as_dtensor`, tensors that DTensor can represent come back as `DTensor`s on (a sub-mesh of) the
    `DeviceMesh`: the one given as `mesh`, or `init_device_mesh` over the default group with the mesh's axes
    as dim names. Without a `device`, the tensors go to the DeviceMesh's device type. `result.shards` then
    holds every local key's `ShardSpec`. The DTensors are made without communication (`from_local` with the
    global shape and stride, `run_check=False`).

    Example (run by every process of a job of 4):
        ```text
        dist.init_process_group("gloo")
        result = load_distributed(ruleset, "path/to/adapter", mesh="ep=4", params={"num_experts": 6})
        result.tensors, result.stats.bytes_read

        device_mesh = init_device_mesh("cuda", (2, 2), mesh_dim_names=("ep", "tp"))
        result = load_distributed(ruleset, "path/to/model", mesh=device_mesh, as_dtensor=True)
        result.tensors["model.norm.weight"].placements   # (Replicate(), Replicate())
        result.shards["model.layers.0.mlp.experts.3.w1.weight"].ids   # {'expert': (3,)}
        ```
    """
    require_process_group()
    device_mesh = mesh if isinstance(mesh, DeviceMesh) else None
    if device_mesh is not None:
        if group is not None and group is not dist.GroupMember.WORLD:
            raise MeshError(
                "a DeviceMesh is given as the mesh together with a process group",
                expected="the DeviceMesh alone: its ranks are the world's",
                fix="pass group=None, or an ownership mesh and the group",
            )
        mesh = mesh_from_device_mesh(device_mesh)
    assert not isinstance(mesh, DeviceMesh)
    mesh = checked_mesh(to_mesh(mesh), dist.get_world_size(group), "the process group")
    rank = dist.get_rank(group)
    if isinstance(ruleset, str) and ruleset == "auto":
        with open_checkpoint(checkpoint) as opened:
            ruleset = detect_ruleset(
                merge_configs(opened.config, config, force=force_config), source=str(checkpoint)
            )
    ruleset = load_ruleset(ruleset)
    if as_dtensor:
        if device_mesh is None:
            device_mesh = _device_mesh(mesh, device=device, group=group)
        device = _dtensor_device(device, device_mesh)
    loaded: LoadResult | None = None
    failure: BaseException | None = None
    try:
        loaded = load(
            ruleset,
            checkpoint,
            mesh=mesh,
            rank=rank,
            params=params,
            config=config,
            device=device,
            dtype=dtype,
            mmap=mmap,
            force_config=force_config,
        )
        # A rank that fails still takes part in the collective below, or the other ranks hang.
        summary = summarize(loaded, mesh=mesh) if verify else None
    except Exception as error:
        if not verify:
            raise
        failure = error
        summary = failed_summary(rank, error)
    if verify:
        gathered: list[Any] = [None] * mesh.num_ranks
        dist.all_gather_object(gathered, summary, group=group)
        if failure is not None:
            raise failure
        assert loaded is not None
        problems = verify_summaries(gathered, ruleset=ruleset, entries=loaded.plan.entries)
        if problems:
            raise integrity_error(problems, ruleset=ruleset, mesh=mesh)
    assert loaded is not None
    result = DistributedResult(tensors=loaded.tensors, plan=loaded.plan, stats=loaded.stats)
    if device_mesh is not None:
        result.shards = shard_specs(result.plan, bound=ruleset.bind(mesh=mesh, params=result.plan.params))
        result.tensors = to_dtensors(result.tensors, shards=result.shards, device_mesh=device_mesh)
    return result


def _device_mesh(
    mesh: Mesh, *, device: torch.device | str | None, group: dist.ProcessGroup | None
) -> DeviceMesh:
    from torch.distributed.device_mesh import init_device_mesh

    if group is not None and group is not dist.GroupMember.WORLD:
        raise MeshError(
            "as_dtensor builds its DeviceMesh over the default process group, not a subgroup",
            expected="group=None",
            fix="pass a DeviceMesh of the subgroup's ranks as mesh",
        )
    device_type = torch.device(device).type if device is not None else "cpu"
    sizes = tuple(size for _, size in mesh.axes)
    return init_device_mesh(device_type, sizes, mesh_dim_names=mesh.names)


def _dtensor_device(device: torch.device | str | None, device_mesh: DeviceMesh) -> torch.device | str:
    if device is None:
        return device_mesh.device_type
    if torch.device(device).type != device_mesh.device_type:
        raise MeshError(
            f"the tensors go to {device} but the DeviceMesh is on {device_mesh.device_type}",
            expected=f"a {device_mesh.device_type} device",
            fix=f"pass device={device_mesh.device_type!r}, or a DeviceMesh of that device type",
        )
    return device
