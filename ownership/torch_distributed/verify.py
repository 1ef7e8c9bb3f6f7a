"""The collective check of a distributed load: per-rank summaries, and the problems they show taken together.

`summarize(result, mesh=...)` packs what one rank loaded: for each owned key its entry index, its selection and a
64-bit checksum of the loaded bytes (`ownership.torch_distributed.checksum`), never the tensors.
`verify_summaries` checks every rank's summary at once: an element of a kept key owned by no rank, replicas of one
selection with different bytes, ranks that saw different checkpoints or plan inputs, and a rank whose load
failed, each one line naming the key, its rule and the ranks. It needs no process group, so it also serves
launchers that gather by other means.

Example (two ranks loaded in one process; a ruleset that leaves expert 3 to no rank):
    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> from ownership import Ruleset, load
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
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ownership.compile.bind import BoundRuleset
from ownership.errors import IntegrityError
from ownership.loading.entries import EntryLike
from ownership.loading.loader import LoadResult
from ownership.placement.decision import DEFAULT_RULE
from ownership.placement.mesh import Mesh, MeshLike, to_mesh
from ownership.placement.selection import Selection, runs_from_indices, selection_from_json, selection_to_json
from ownership.ruleset import Ruleset
from ownership.torch_distributed.checksum import checksums

__all__ = ["RankSummary", "failed_summary", "integrity_error", "summarize", "verify_summaries"]

# One packed item per owned key: entry index, selection id (into RankSummary.selections), checksum.
_ITEM = struct.Struct("<IIQ")
# Problems listed in the message; the rest are counted.
_MAX_LISTED = 20
# Bits of selection membership per int64 word (the sign bit stays clear).
_WORD_BITS = 62


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
    """The id of the rule that decides `key`, and whether it drops it."""
    found = bound.classify(key)
    if found is None:
        return DEFAULT_RULE, bound.default == "drop"
    return found[0].id, found[0].drop


def _selection_from_text(text: str) -> Selection:
    return selection_from_json(json.loads(text))


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


def failed_summary(rank: int, error: BaseException) -> RankSummary:
    """The summary of a rank whose load failed: the others then name it, and nobody waits forever."""
    return RankSummary(
        rank=rank, header=(), selections=[], items=b"", error=f"{type(error).__name__}: {error}"
    )


def integrity_error(problems: Sequence[str], *, ruleset: Ruleset, mesh: Mesh) -> IntegrityError:
    """One `IntegrityError` for the problems `verify_summaries` found, the first few listed."""
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
