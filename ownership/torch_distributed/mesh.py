"""Meshes from the launcher: a process group, torchrun's environment, or a `DeviceMesh` with named dims.

Each checks the mesh against what launched the job, so a mesh whose size is not the world's is an error before
anything loads; a process's mesh rank is then its rank in the group (row-major over the declared axes).

Example:
    >>> mesh_from_env("pp=2,ep=2", env={"RANK": "3", "WORLD_SIZE": "4"})
    Mesh(axes=(('pp', 2), ('ep', 2)))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from ownership.errors import MeshError
from ownership.placement.mesh import Mesh, to_mesh

__all__ = [
    "checked_mesh",
    "mesh_from_device_mesh",
    "mesh_from_env",
    "mesh_from_process_group",
    "require_process_group",
]


def mesh_from_process_group(axes: Mapping[str, int] | str, group: dist.ProcessGroup | None = None) -> Mesh:
    """The mesh `axes` (`"pp=2,ep=4"` or `{"pp": 2, "ep": 4}`), checked against the process group's size.

    The product of the axis sizes must equal `dist.get_world_size(group)`; a process's mesh rank is then its
    rank in the group (row-major over the declared axes, the last axis fastest).

    Example (no process group in a doctest, so the error):
        >>> mesh_from_process_group("ep=4")
        Traceback (most recent call last):
        ...
        ownership.errors.MeshError: no torch.distributed process group is initialised. Fix: call torch.distributed.init_process_group (torchrun sets RANK and WORLD_SIZE) before building the mesh
    """
    require_process_group()
    return checked_mesh(to_mesh(axes), dist.get_world_size(group), "the process group")


def require_process_group() -> None:
    """A `MeshError` unless a `torch.distributed` process group is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise MeshError(
            "no torch.distributed process group is initialised",
            fix="call torch.distributed.init_process_group (torchrun sets RANK and WORLD_SIZE) before building "
            "the mesh",
        )


def mesh_from_env(axes: Mapping[str, int] | str, env: Mapping[str, str] | None = None) -> Mesh:
    """The mesh `axes`, checked against `WORLD_SIZE` (and `RANK`, when set) of the environment, as torchrun sets.

    For launchers that set the variables without a process group: pass `int(os.environ["RANK"])` as the
    rank to `ownership.load`.

    Example:
        >>> mesh_from_env("pp=2,ep=2", env={"RANK": "3", "WORLD_SIZE": "4"})
        Mesh(axes=(('pp', 2), ('ep', 2)))
        >>> mesh_from_env("ep=8", env={"WORLD_SIZE": "4"})
        Traceback (most recent call last):
        ...
        ownership.errors.MeshError: mesh ep=8 has 8 ranks but WORLD_SIZE has 4: found 8 = ep=8, expected 4. Fix: declare axes whose sizes multiply to 4, or launch 8 processes
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE")
    mesh = checked_mesh(to_mesh(axes), world, "WORLD_SIZE")
    if "RANK" in env:
        rank = _env_int(env, "RANK")
        if not 0 <= rank < world:
            raise MeshError(
                f"RANK={rank} is outside WORLD_SIZE={world}",
                expected=f"0..{world - 1}",
                fix="check the launcher's RANK and WORLD_SIZE",
            )
    return mesh


def mesh_from_device_mesh(device_mesh: Any) -> Mesh:
    """The mesh of a `torch.distributed.device_mesh.DeviceMesh`: its `mesh_dim_names` and shape, in order.

    The DeviceMesh must number its ranks row-major from 0 (as `init_device_mesh` does over the whole world),
    so that the mesh rank of a process is its global rank.

    Example (in a job of 8 processes):
        ```text
        device_mesh = init_device_mesh("cuda", (2, 4), mesh_dim_names=("pp", "ep"))
        mesh_from_device_mesh(device_mesh)   # Mesh(axes=(('pp', 2), ('ep', 4)))
        ```
    """
    names = getattr(device_mesh, "mesh_dim_names", None)
    layout: torch.Tensor = device_mesh.mesh
    shape = tuple(int(size) for size in layout.shape)
    if not names:
        raise MeshError(
            f"the DeviceMesh of shape {list(shape)} has no mesh_dim_names",
            expected="a name per mesh dim, e.g. ('pp', 'ep')",
            fix="pass mesh_dim_names to init_device_mesh",
        )
    mesh = Mesh(tuple(zip((str(name) for name in names), shape, strict=True)))
    ranks = [int(rank) for rank in layout.flatten().tolist()]
    if ranks != list(range(len(ranks))):
        raise MeshError(
            f"the DeviceMesh {mesh} does not number its ranks row-major from 0",
            found=f"ranks {ranks[:8]}{'...' if len(ranks) > 8 else ''}",
            expected=f"0..{len(ranks) - 1} in row-major order",
            fix="build the DeviceMesh over the whole world with init_device_mesh, or pass a Mesh and a group",
        )
    return mesh


def checked_mesh(mesh: Mesh, world: int, what: str) -> Mesh:
    """`mesh`, unless its size is not `world` (the size of `what`): a `MeshError` saying how to fix it."""
    if mesh.num_ranks != world:
        raise MeshError(
            f"mesh {mesh} has {mesh.num_ranks} ranks but {what} has {world}",
            found=f"{mesh.num_ranks} = {' x '.join(f'{name}={size}' for name, size in mesh.axes)}",
            expected=str(world),
            fix=f"declare axes whose sizes multiply to {world}, or launch {mesh.num_ranks} processes",
        )
    return mesh


def _env_int(env: Mapping[str, str], name: str) -> int:
    text = env.get(name)
    if text is None or not text.strip().isdigit():
        raise MeshError(
            f"environment variable {name} is {'unset' if text is None else repr(text)}",
            expected="a non-negative integer",
            fix="launch with torchrun, or set RANK and WORLD_SIZE",
        )
    return int(text)
