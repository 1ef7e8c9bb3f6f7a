"""Loading under `torch.distributed`: meshes from a process group, and each rank's load checked across ranks.

`load_distributed(ruleset, checkpoint, mesh=...)` loads this process's share (its rank is
`dist.get_rank(group)`, its coordinates those of that rank on `mesh`). With `verify=True` it then runs one
collective, `all_gather_object` of a compact summary per rank: for each owned key its entry index, its selection
and a 64-bit checksum of the loaded bytes, never the tensors. Every rank checks the same gathered summaries, so
every rank raises `IntegrityError` or every rank returns: an element of a kept key owned by no rank, replicas of
one selection with different bytes, ranks that saw different checkpoints or plan inputs, and a rank whose load
failed are all reported, naming the key, its rule and the ranks.

The check itself (`summarize`, `verify_summaries`) needs no process group, so it also serves launchers that
gather by other means. Checksums are computed where the tensors are (a CUDA load is hashed on its GPU, never
copied back), with the same value on any device.

With `as_dtensor=True` (and a `DeviceMesh` as `mesh`, or one built over the whole world from the mesh's axes),
tensors that are replicated or split into `torch.chunk`'s contiguous chunks over mesh axes come back as
`DTensor`s with `Replicate()` / `Shard(dim)` placements; the rest (expert partitions, strided selections) stay
local tensors. `result.shards` says, per local key, which: the global key and shape, the placements, and the
global ids (experts, rows) the rank holds (see `ownership.sharding`).

Example (two ranks loaded in one process; a ruleset that leaves expert 3 to no rank):
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from ownership import Ruleset
    >>> from ownership.loader import load
    >>> folder = tempfile.mkdtemp()
    >>> save_file({f"m.experts.{e}.w": torch.full((2, 2), float(e)) for e in range(4)}, f"{folder}/a.safetensors")
    >>> ruleset = Ruleset.from_text('''
    ... name = "gap"
    ... axes = ["ep"]
    ... [[rule]]
    ... id = "expert"
    ... match = "m.experts.<expert>.w"
    ... place = { expert = { over = "ep", strategy = "table", size = 4, table = [[0, 1], [2]] } }
    ... ''')
    >>> results = [load(ruleset, f"{folder}/a.safetensors", mesh="ep=2", rank=r) for r in range(2)]
    >>> summaries = [summarize(result, mesh="ep=2") for result in results]
    >>> verify_summaries(summaries, ruleset=ruleset, entries=results[0].plan.entries)
    ["key 'm.experts.3.w' (rule 'expert') is owned by no rank"]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ownership.compile import BoundRuleset
from ownership.errors import MeshError, OwnershipError
from ownership.loader import LoadResult, load
from ownership.mesh import Mesh
from ownership.plan import EntryLike
from ownership.ruleset import MeshLike, Ruleset, to_mesh
from ownership.selection import Selection, runs_from_indices, selection_to_json
from ownership.sharding import REPLICATE, ShardSpec, shard_specs

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

# One packed item per owned key: entry index, selection id (into RankSummary.selections), checksum.
_ITEM = struct.Struct("<IIQ")
# Problems listed in the message; the rest are counted.
_MAX_LISTED = 20
# Bits of selection membership per int64 word (the sign bit stays clear).
_WORD_BITS = 62
# splitmix64's odd multipliers, as the int64 values torch multiplies with (wrapping).
_M1 = 0x9E3779B97F4A7C15 - 2**64
_M2 = 0xBF58476D1CE4E5B9 - 2**64
_M3 = 0x94D049BB133111EB - 2**64
# Words hashed per step of a large tensor: bounds the temporaries (three of this size) on its device.
_CHUNK_WORDS = 2**20
# Tensors up to this size are hashed together, in batches of up to _CHUNK_WORDS words.
_SMALL_BYTES = 2**16


class IntegrityError(OwnershipError):
    """The ranks' loads, taken together, are not the checkpoint: a gap, disagreeing replicas, or a failed rank.

    `problems` holds one line per problem, each naming the key, its rule and the ranks concerned.
    """

    default_code = "integrity"

    def __init__(self, message: str, *, problems: Sequence[str] = (), **fields: Any) -> None:
        self.problems = list(problems)
        super().__init__(message, **fields)


# -- meshes ----------------------------------------------------------------------------------------------------


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
    if not dist.is_available() or not dist.is_initialized():
        raise MeshError(
            "no torch.distributed process group is initialised",
            fix="call torch.distributed.init_process_group (torchrun sets RANK and WORLD_SIZE) before building "
            "the mesh",
        )
    return _checked(to_mesh(axes), dist.get_world_size(group), "the process group")


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
    mesh = _checked(to_mesh(axes), world, "WORLD_SIZE")
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


def _checked(mesh: Mesh, world: int, what: str) -> Mesh:
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


# -- loading ---------------------------------------------------------------------------------------------------


def load_distributed(
    ruleset: Ruleset,
    checkpoint: str | os.PathLike[str],
    *,
    mesh: MeshLike | DeviceMesh,
    params: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    group: dist.ProcessGroup | None = None,
    as_dtensor: bool = False,
    mmap: bool = True,
) -> LoadResult:
    """Load this process's share of `checkpoint`: rank `dist.get_rank(group)` on `mesh`.

    Host tensors may be views of the file's pages (`mmap`, as in `load`).

    `mesh` is an ownership mesh (`"pp=2,ep=4"`, a mapping, a `Mesh`) or a `DeviceMesh` with named dims (then
    its dims are the axes; see `mesh_from_device_mesh`). With a CUDA `device`, tensors are read straight onto
    it through pinned staging (`ownership.staging`).

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
    mesh = _checked(to_mesh(mesh), dist.get_world_size(group), "the process group")
    rank = dist.get_rank(group)
    if as_dtensor:
        if device_mesh is None:
            device_mesh = _device_mesh(mesh, device=device, group=group)
        device = _dtensor_device(device, device_mesh)
    if not verify:
        result = load(
            ruleset, checkpoint, mesh=mesh, rank=rank, params=params, device=device, dtype=dtype, mmap=mmap
        )
        return _as_dtensors(result, ruleset, mesh, device_mesh) if device_mesh is not None else result
    loaded: LoadResult | None = None
    failure: BaseException | None = None
    try:
        loaded = load(
            ruleset, checkpoint, mesh=mesh, rank=rank, params=params, device=device, dtype=dtype, mmap=mmap
        )
        summary = summarize(loaded, mesh=mesh)
    except Exception as error:  # the collective below must still run, or the other ranks hang
        failure = error
        summary = RankSummary(rank=rank, header=(), selections=[], items=b"", error=_describe_error(error))
    gathered: list[Any] = [None] * mesh.num_ranks
    dist.all_gather_object(gathered, summary, group=group)
    summaries: list[RankSummary] = gathered
    if failure is not None:
        raise failure
    assert loaded is not None
    problems = verify_summaries(summaries, ruleset=ruleset, entries=loaded.plan.entries)
    if problems:
        raise _integrity_error(problems, ruleset=ruleset, mesh=mesh)
    return _as_dtensors(loaded, ruleset, mesh, device_mesh) if device_mesh is not None else loaded


# -- DTensors --------------------------------------------------------------------------------------------------


def to_dtensors(
    tensors: Mapping[str, torch.Tensor], *, shards: Mapping[str, ShardSpec], device_mesh: DeviceMesh
) -> dict[str, torch.Tensor]:
    """`tensors` with every one whose `ShardSpec` has axes made a `DTensor` on that sub-mesh of `device_mesh`.

    Local tensors must already be on the DeviceMesh's device type. No communication: `DTensor.from_local` with
    the spec's global shape and contiguous stride, `run_check=False`.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import Placement

    submeshes: dict[tuple[str, ...], DeviceMesh] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        spec = shards.get(key)
        if spec is None or not spec.is_dtensor:
            out[key] = tensor
            continue
        submesh = submeshes.get(spec.axes)
        if submesh is None:
            names = tuple(device_mesh.mesh_dim_names or ())
            submesh = device_mesh if spec.axes == names else device_mesh[spec.axes]
            submeshes[spec.axes] = submesh
        placements: list[Placement] = [
            Replicate() if p == REPLICATE else Shard(int(p.removeprefix("shard(").removesuffix(")")))
            for p in spec.placements
        ]
        out[key] = DTensor.from_local(
            tensor,
            submesh,
            placements,
            run_check=False,
            shape=torch.Size(spec.global_shape),
            stride=_contiguous_stride(spec.global_shape),
        )
    return out


def _as_dtensors(result: LoadResult, ruleset: Ruleset, mesh: Mesh, device_mesh: DeviceMesh) -> LoadResult:
    bound = ruleset.bind(mesh=mesh, params=result.plan.params)
    result.shards = shard_specs(result.plan, bound=bound)
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


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        stride[d] = stride[d + 1] * max(shape[d + 1], 1)
    return tuple(stride)


# -- summaries and the check -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankSummary:
    """What one rank loaded, compactly: enough to check coverage and replicas across ranks, no tensor data.

    `header` is (ruleset name, mesh, params as JSON, number of entries, digest of the entries' keys, dtypes and
    shapes); `selections` are the distinct selections in plan JSON form; `items` packs, per owned key, the
    entry index, the selection's index in `selections` and a 64-bit checksum of the loaded bytes.
    """

    rank: int
    header: tuple[str, ...]
    selections: list[str]
    items: bytes
    error: str | None = None


def summarize(result: LoadResult, *, mesh: MeshLike) -> RankSummary:
    """The summary of one rank's load: selections per owned key and checksums of the loaded tensors."""
    plan = result.plan
    selection_ids: dict[str, int] = {}
    numbers: list[tuple[int, int]] = []
    tensors: list[torch.Tensor] = []
    for i, decision in zip(plan.index, plan.owned, strict=True):
        text = json.dumps(selection_to_json(decision.selection), separators=(",", ":"))
        numbers.append((i, selection_ids.setdefault(text, len(selection_ids))))
        tensors.append(_local(result.tensors[decision.local_key or decision.key]))
    packed = bytearray()
    for (i, number), value in zip(numbers, checksums(tensors), strict=True):
        packed += _ITEM.pack(i, number, value)
    header = (
        plan.ruleset,
        str(to_mesh(mesh)),
        json.dumps(plan.params, sort_keys=True, default=str),
        str(len(plan.entries)),
        _entries_digest(plan.entries),
    )
    return RankSummary(rank=plan.rank, header=header, selections=list(selection_ids), items=bytes(packed))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def checksum(tensor: torch.Tensor) -> int:
    """A 64-bit checksum of a tensor's dtype and bytes, computed on the tensor's device; see `checksums`.

    Example:
        >>> checksum(torch.zeros(3)) == checksum(torch.zeros(3)), checksum(torch.zeros(3)) == checksum(torch.ones(3))
        (True, False)
    """
    return checksums([tensor])[0]


def checksums(tensors: Sequence[torch.Tensor]) -> list[int]:
    """64-bit checksums of tensors' dtypes and bytes, the same for the same bytes on any device.

    The bytes, as 64-bit words (the last one zero-padded), are mixed each with its position (splitmix64's
    multipliers and an xor-shift, a bijection of the word for each position) and summed modulo 2**64, on the tensor's
    device in steps of 8 MiB; BLAKE2b then mixes the sum with the dtype and byte count. Integer sums do not
    depend on the order of the additions, so a GPU and a CPU agree bit for bit, and a GPU load is hashed without
    copying it back. A change of one word always changes the sum. Small tensors are hashed in batches; each
    device's sums come back in one transfer.

    Example:
        >>> a, b = torch.arange(5, dtype=torch.int16), torch.arange(5, dtype=torch.int16).flip(0)
        >>> len(set(checksums([a, b, a.to(torch.int32)]))), checksums([a]) == [checksum(a)]
        (3, True)
    """
    sums: list[torch.Tensor | None] = [None] * len(tensors)
    data: list[torch.Tensor] = []
    small: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        raw = _bytes(tensor)
        data.append(raw)
        if raw.numel() <= _SMALL_BYTES:
            small.setdefault(raw.device, []).append(i)
        else:
            sums[i] = _large_sum(raw)
    for device, indices in small.items():
        batch: list[int] = []
        words = 0
        for i in indices:
            size = -(-data[i].numel() // 8)
            if batch and words + size > _CHUNK_WORDS:
                _small_sums(data, batch, sums, device)
                batch, words = [], 0
            batch.append(i)
            words += size
        if batch:
            _small_sums(data, batch, sums, device)
    values: dict[int, int] = {}
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, value in enumerate(sums):
        assert value is not None
        by_device.setdefault(value.device, []).append((i, value))
    for items in by_device.values():
        stacked = torch.stack([value for _, value in items]).tolist()
        values.update(zip((i for i, _ in items), (int(v) for v in stacked), strict=True))
    out = []
    for i, tensor in enumerate(tensors):
        text = f"{tensor.dtype}|{data[i].numel()}|{values[i] % 2**64}"
        out.append(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))
    return out


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor on its device, 8-byte aligned (copied only when not)."""
    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    raw = data.reshape(-1).view(torch.uint8)
    if raw.storage_offset() % 8:
        raw = raw.clone()
    return raw


def _mix(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each word mixed with its position; `positions` is consumed. The right shift is masked to be logical."""
    x = words * _M1
    x.bitwise_xor_(positions.mul_(_M2))
    x.bitwise_xor_((x >> 29).bitwise_and_(2**35 - 1))
    return x.mul_(_M3)


def _large_sum(raw: torch.Tensor) -> torch.Tensor:
    num_words, tail = divmod(raw.numel(), 8)
    words = raw[: num_words * 8].view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=raw.device)
    for start in range(0, num_words, _CHUNK_WORDS):
        chunk = words[start : start + _CHUNK_WORDS]
        positions = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=raw.device)
        total += _mix(chunk, positions).sum()
    if tail:
        padded = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        padded[:tail] = raw[num_words * 8 :]
        position = torch.full((1,), num_words, dtype=torch.int64, device=raw.device)
        total += _mix(padded.view(torch.int64), position).sum()
    return total


def _small_sums(
    data: Sequence[torch.Tensor], batch: Sequence[int], sums: list[torch.Tensor | None], device: torch.device
) -> None:
    """The sums of several small tensors at once: their padded bytes joined, positions restarting per tensor."""
    pieces: list[torch.Tensor] = []
    counts: list[int] = []
    for i in batch:
        raw = data[i]
        pieces.append(raw)
        pad = -raw.numel() % 8
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8, device=device))
        counts.append((raw.numel() + pad) // 8)
    total = sum(counts)
    words = torch.cat(pieces).view(torch.int64) if total else torch.zeros(0, dtype=torch.int64, device=device)
    count_tensor = torch.tensor(counts, dtype=torch.int64, device=device)
    starts = torch.cumsum(count_tensor, 0) - count_tensor
    owner = torch.repeat_interleave(torch.arange(len(batch), device=device), count_tensor, output_size=total)
    positions = torch.arange(total, dtype=torch.int64, device=device) - starts[owner]
    batch_sums = torch.zeros(len(batch), dtype=torch.int64, device=device)
    batch_sums.index_add_(0, owner, _mix(words, positions))
    for j, i in enumerate(batch):
        sums[i] = batch_sums[j]


def verify_summaries(
    summaries: Sequence[RankSummary], *, ruleset: Ruleset, entries: Sequence[EntryLike]
) -> list[str]:
    """Problems with the ranks' summaries taken together, one readable line each; empty when they are sound.

    `entries` are the checkpoint's entries as one rank listed them (`result.plan.entries`); they give the
    shapes, and every rank must have listed the same. Checks, in order: every rank loaded; every rank saw the
    same ruleset, mesh, params and entries; every element of every key the ruleset does not drop is selected
    by at least one rank; ranks that hold the same selection of a key hold the same bytes. Overlapping but
    different selections are allowed (EPLB replicas).
    """
    failed = [s for s in summaries if s.error is not None]
    if failed:
        return [f"rank {s.rank} could not load its share: {s.error}" for s in failed]
    headers: dict[tuple[str, ...], list[int]] = {}
    for s in summaries:
        headers.setdefault(s.header, []).append(s.rank)
    if len(headers) > 1:
        return [
            f"ranks disagree on what they loaded: {_ranks(ranks)} had ruleset {h[0]!r}, mesh {h[1]}, "
            f"params {h[2]}, {h[3]} entries (digest {h[4]})"
            for h, ranks in headers.items()
        ]
    _, mesh_text, params_text, _, digest = summaries[0].header
    if _entries_digest(entries) != digest:
        return [
            f"the entries given are not those the ranks listed (digest {_entries_digest(entries)}, not {digest})"
        ]
    bound = ruleset.bind(mesh=mesh_text, params=json.loads(params_text))
    return _check(summaries, bound, entries)


def _entries_digest(entries: Sequence[EntryLike]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for entry in entries:
        digest.update(f"{entry.key}\t{entry.dtype}\t{entry.shape}\n".encode())
    return digest.hexdigest()


def _check(summaries: Sequence[RankSummary], bound: BoundRuleset, entries: Sequence[EntryLike]) -> list[str]:
    # Per key: selection text -> {checksum: ranks}.
    held: dict[int, dict[str, dict[int, list[int]]]] = {}
    for s in summaries:
        for index, number, value in _ITEM.iter_unpack(s.items):
            held.setdefault(index, {}).setdefault(s.selections[number], {}).setdefault(value, []).append(
                s.rank
            )
    problems: list[str] = []
    coverage_cache: dict[tuple[tuple[int, ...], frozenset[str]], list[str]] = {}
    for index, entry in enumerate(entries):
        rule, dropped = _rule_of(bound, entry.key)
        if dropped:
            continue
        where = f"key {entry.key!r} (rule {rule!r})"
        by_selection = held.get(index, {})
        if not by_selection:
            problems.append(f"{where} is owned by no rank")
            continue
        for text, by_value in by_selection.items():
            if len(by_value) > 1:
                part = _describe_selection(_selection_from_text(text), entry.shape)
                values = "; ".join(f"{_ranks(ranks)}: {value:016x}" for value, ranks in by_value.items())
                problems.append(f"{where}: {part} differs between its replicas (checksums {values})")
        if "null" in by_selection or entry.shape is None:
            continue
        cache_key = (entry.shape, frozenset(by_selection))
        gaps = coverage_cache.get(cache_key)
        if gaps is None:
            gaps = coverage_cache[cache_key] = _gaps(entry.shape, list(by_selection))
        problems.extend(f"{where}: {gap} owned by no rank" for gap in gaps)
    return problems


def _rule_of(bound: BoundRuleset, key: str) -> tuple[str, bool]:
    match = bound.match(key)
    if match is None:
        return "<default>", bound.default == "drop"
    rule = bound.by_group[match.lastgroup]
    return rule.id, rule.drop


def _selection_from_text(text: str) -> Selection:
    data = json.loads(text)
    if data is None:
        return None
    return tuple(None if dim is None else tuple(tuple(run) for run in dim) for dim in data)


def _gaps(shape: tuple[int, ...], texts: Sequence[str]) -> list[str]:
    """The parts of a tensor of `shape` that none of the selections covers, described per dim.

    Each dim's indices fall into classes by which selections keep them; a cell (one class per dim) is covered
    when some selection keeps every one of its classes. The classes are few (about one per owner), so the
    cells are checked one by one.
    """
    if any(size == 0 for size in shape):
        return []
    selections = [_selection_from_text(text) for text in texts]
    num_words = (len(selections) + _WORD_BITS - 1) // _WORD_BITS
    per_dim: list[list[tuple[int, list[int]]]] = []
    for d, size in enumerate(shape):
        signature = torch.zeros((size, num_words), dtype=torch.int64)
        for s, selection in enumerate(selections):
            word, bit = divmod(s, _WORD_BITS)
            column = signature[:, word]
            dim = None if selection is None else selection[d]
            if dim is None:
                column.bitwise_or_(1 << bit)
                continue
            for start, stop, step in dim:
                column[start:stop:step].bitwise_or_(1 << bit)
        rows, inverse = torch.unique(signature, dim=0, return_inverse=True)
        classes = []
        for c, row in enumerate(rows.tolist()):
            mask = sum(int(value) << (w * _WORD_BITS) for w, value in enumerate(row))
            classes.append((mask, (inverse == c).nonzero().flatten().tolist()))
        per_dim.append(classes)
    gaps = []
    full = (1 << len(selections)) - 1
    for cell in itertools.product(*per_dim):
        mask = full
        for class_mask, _ in cell:
            mask &= class_mask
        if mask == 0:
            parts = [
                f"{_dim_noun(d, len(shape))} {_describe_indices(indices)} of dim {d}"
                for d, (_, indices) in enumerate(cell)
                if len(indices) < shape[d]
            ]
            gaps.append(" x ".join(parts) + (" are" if parts else "the whole tensor is"))
    return gaps


def _describe_selection(selection: Selection, shape: tuple[int, ...] | None) -> str:
    if selection is None or shape is None:
        return "the whole tensor"
    parts = [
        f"{_dim_noun(d, len(shape))} {_describe_indices([i for run in dim for i in range(*run)])} of dim {d}"
        for d, dim in enumerate(selection)
        if dim is not None
    ]
    return " x ".join(parts)


def _dim_noun(d: int, num_dims: int) -> str:
    if num_dims >= 2 and d == 0:
        return "rows"
    if num_dims == 2 and d == 1:
        return "columns"
    return "indices"


def _describe_indices(indices: Sequence[int], limit: int = 6) -> str:
    runs = runs_from_indices(sorted(indices))
    parts = []
    for start, stop, step in runs[:limit]:
        last = start + (len(range(start, stop, step)) - 1) * step
        if last == start:
            parts.append(str(start))
        elif step == 1:
            parts.append(f"{start}..{last}")
        else:
            parts.append(f"{start}..{last} step {step}")
    if len(runs) > limit:
        parts.append(f"... ({len(indices)} in all)")
    return ", ".join(parts)


def _ranks(ranks: Sequence[int]) -> str:
    """`rank 2`, `ranks 0-3`, `ranks 0-1, 5`."""
    ordered = sorted(set(ranks))
    groups = []
    for _, run in itertools.groupby(enumerate(ordered), key=lambda item: item[1] - item[0]):
        values = [value for _, value in run]
        groups.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ("rank " if len(ordered) == 1 else "ranks ") + ", ".join(groups)


def _describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _integrity_error(problems: Sequence[str], *, ruleset: Ruleset, mesh: Mesh) -> IntegrityError:
    listed = [f"  {problem}" for problem in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return IntegrityError(
        f"the ranks' loads do not make up the checkpoint ({_ranks(list(mesh.ranks()))} checked): {count}",
        source=f"ruleset {ruleset.name!r} on mesh {mesh}",
        fix=f"run `ownership lint {ruleset.name} CHECKPOINT --mesh {mesh}` with the same params to see the rules",
        detail="\n".join(listed),
        problems=problems,
    )
