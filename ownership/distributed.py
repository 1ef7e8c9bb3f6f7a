"""Loading under `torch.distributed`: meshes from a process group, and each rank's load checked across ranks.

`load_distributed(ruleset, checkpoint, mesh=...)` loads this process's share (its rank is
`dist.get_rank(group)`, its coordinates those of that rank on `mesh`). With `verify=True` it then runs one
collective, `all_gather_object` of a compact summary per rank: for each owned key its entry index, its selection
and a 64-bit checksum of the loaded bytes, never the tensors. Every rank checks the same gathered summaries, so
every rank raises `IntegrityError` or every rank returns: an element of a kept key owned by no rank, replicas of
one selection with different bytes, ranks that saw different checkpoints or plan inputs, and a rank whose load
failed are all reported, naming the key, its rule and the ranks.

The check itself (`summarize`, `verify_summaries`) needs no process group, so it also serves launchers that
gather by other means.

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

import ctypes
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

from ownership.compile import BoundRuleset
from ownership.errors import MeshError, OwnershipError
from ownership.loader import LoadResult, load
from ownership.mesh import Mesh
from ownership.plan import EntryLike
from ownership.ruleset import MeshLike, Ruleset, to_mesh
from ownership.selection import Selection, runs_from_indices, selection_to_json

__all__ = [
    "IntegrityError",
    "RankSummary",
    "checksum",
    "load_distributed",
    "mesh_from_device_mesh",
    "mesh_from_env",
    "mesh_from_process_group",
    "summarize",
    "verify_summaries",
]

# One packed item per owned key: entry index, selection id (into RankSummary.selections), checksum.
_ITEM = struct.Struct("<IIQ")
# Problems listed in the message; the rest are counted.
_MAX_LISTED = 20
# Bits of selection membership per int64 word (the sign bit stays clear).
_WORD_BITS = 62


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
    mesh: MeshLike,
    params: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    group: dist.ProcessGroup | None = None,
) -> LoadResult:
    """Load this process's share of `checkpoint`: rank `dist.get_rank(group)` on `mesh`.

    With `verify`, one `all_gather_object` of per-rank summaries (selections and 64-bit checksums, not
    tensors) lets every rank check the whole job; every rank then raises the same `IntegrityError`, or none
    does. A rank whose own load fails raises its own error after the collective, so that no rank waits
    forever; the others raise `IntegrityError` naming it. Under NCCL, set the current CUDA device first
    (`all_gather_object` needs it). Checksums are taken on the CPU before `device` moves the tensors.

    Example (run by every process of a job of 4):
        ```text
        dist.init_process_group("gloo")
        result = load_distributed(ruleset, "path/to/adapter", mesh="ep=4", params={"num_experts": 6})
        result.tensors, result.stats.bytes_read
        ```
    """
    mesh = _checked(to_mesh(mesh), dist.get_world_size(group), "the process group")
    rank = dist.get_rank(group)
    if not verify:
        return load(ruleset, checkpoint, mesh=mesh, rank=rank, params=params, device=device, dtype=dtype)
    result: LoadResult | None = None
    failure: BaseException | None = None
    try:
        result = load(ruleset, checkpoint, mesh=mesh, rank=rank, params=params, dtype=dtype)
        summary = summarize(result, mesh=mesh)
    except Exception as error:  # the collective below must still run, or the other ranks hang
        failure = error
        summary = RankSummary(rank=rank, header=(), selections=[], items=b"", error=_describe_error(error))
    gathered: list[Any] = [None] * mesh.num_ranks
    dist.all_gather_object(gathered, summary, group=group)
    summaries: list[RankSummary] = gathered
    if failure is not None:
        raise failure
    assert result is not None
    problems = verify_summaries(summaries, ruleset=ruleset, entries=result.plan.entries)
    if problems:
        raise _integrity_error(problems, ruleset=ruleset, mesh=mesh)
    if device is not None:
        result.tensors = {key: tensor.to(device) for key, tensor in result.tensors.items()}
    return result


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
    packed = bytearray()
    for i, decision in zip(plan.index, plan.owned, strict=True):
        text = json.dumps(selection_to_json(decision.selection), separators=(",", ":"))
        number = selection_ids.setdefault(text, len(selection_ids))
        tensor = result.tensors[decision.local_key or decision.key]
        packed += _ITEM.pack(i, number, checksum(tensor))
    header = (
        plan.ruleset,
        str(to_mesh(mesh)),
        json.dumps(plan.params, sort_keys=True, default=str),
        str(len(plan.entries)),
        _entries_digest(plan.entries),
    )
    return RankSummary(rank=plan.rank, header=header, selections=list(selection_ids), items=bytes(packed))


def checksum(tensor: torch.Tensor) -> int:
    """A 64-bit BLAKE2b checksum of a tensor's dtype and bytes (the bytes are hashed in place on the CPU).

    Example:
        >>> checksum(torch.zeros(3)) == checksum(torch.zeros(3)), checksum(torch.zeros(3)) == checksum(torch.ones(3))
        (True, False)
    """
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    digest = hashlib.blake2b(str(data.dtype).encode(), digest_size=8)
    num_bytes = data.numel() * data.element_size()
    if num_bytes:
        # A view of the tensor's memory: hashing reads it without copying (and without numpy).
        digest.update(memoryview((ctypes.c_char * num_bytes).from_address(data.data_ptr())))
    return int.from_bytes(digest.digest(), "little")


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
