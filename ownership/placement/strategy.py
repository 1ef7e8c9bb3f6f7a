"""Placement strategies: how the ids `0..n-1` of one index are split over the coordinates of one mesh axis.

Each strategy answers both directions: `owned(coord)` (the ids a coordinate holds, in local slot order) and
`owners(g)` (the `(coord, slot)` pairs that hold id g). The whole-mesh questions (lint, `plan --all-ranks`) use
`owners`, so no caller ever loops over coordinates to find who holds an id.

| strategy | owned(c) |
|---|---|
| `linear` | vLLM `determine_expert_map`: `n_c = n//P + [c < n%P]` ids from `c*(n//P) + min(c, n%P)` |
| `round_robin` | `c, c+P, c+2P, ...` |
| `table` | an explicit list per coordinate; an id may be on several (replicas, EPLB) |
| `layers` | vLLM `get_pp_indices` (the remainder goes to the stages just before the last), or explicit sizes |
| `vllm_contiguous` | PR #42737: `[c*n_c, c*n_c + n_c)`; may leave ids unowned or owned twice when P does not divide n |
| `shard` | equal contiguous chunks (per part for packed dims); uneven only by opt-in (then as `linear`) |
| `shard` with `pad` | vLLM's `VocabParallelEmbedding`: `n` rounded up to a multiple of `pad`, cut in equal chunks; the last coordinates hold fewer real ids (or none), the rest is padding |
| `shard` with `align` | chunks of `ceil(n / (P*align)) * align` ids, the last coordinates taking what is left (vLLM's cut of GPT-OSS's MXFP4 experts in 32-element blocks) |

Example:
    >>> s = make_strategy("linear", num_ids=10, num_coords=4)
    >>> [list(s.owned(c)) for c in range(4)]
    [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    >>> s.owners(7)
    ((2, 1),)
    >>> vocab = make_strategy("shard", num_ids=49155, num_coords=4, pad=64)   # padded to 49216: 12304 each
    >>> [len(vocab.owned(c)) for c in range(4)], vocab.chunk
    ([12304, 12304, 12304, 12243], 12304)
    >>> blocks = make_strategy("shard", num_ids=2880, num_coords=8, align=32)   # 90 blocks of 32 over 8
    >>> [len(blocks.owned(c)) for c in (0, 6, 7)]
    [384, 384, 192]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "Layers",
    "Linear",
    "Part",
    "RoundRobin",
    "Shard",
    "ShardProblem",
    "Strategy",
    "Table",
    "VllmContiguous",
    "linear_count",
    "linear_start",
    "make_strategy",
]

Owners = tuple[tuple[int, int], ...]


def linear_count(num_ids: int, num_coords: int, coord: int) -> int:
    """vLLM's `local_num_experts` for a coordinate under linear placement."""
    base, extra = divmod(num_ids, num_coords)
    return base + (1 if coord < extra else 0)


def linear_start(num_ids: int, num_coords: int, coord: int) -> int:
    base, extra = divmod(num_ids, num_coords)
    return coord * base + min(coord, extra)


@dataclass(frozen=True)
class Strategy(ABC):
    """Split of `num_ids` ids over `num_coords` coordinates of one axis."""

    name: str = field(init=False, default="")
    num_ids: int
    num_coords: int

    @property
    def exact(self) -> bool:
        """Whether every id is owned by exactly one coordinate by construction (else `owned` must be counted to
        know; `table` and `vllm_contiguous` may lose or double ids)."""
        return False

    @abstractmethod
    def owned(self, coord: int) -> Sequence[int]:
        """Ids held by `coord`, in local slot order (slot j holds `owned(coord)[j]`)."""

    def owners(self, g: int) -> Owners:
        """`(coord, slot)` for every coordinate holding id `g`; empty when nobody does."""
        return self._inverse()[g] if 0 <= g < self.num_ids else ()

    def slot_table(self, coord: int) -> list[int]:
        """Local slot of each id on `coord`, or -1: the per-rank decision is one list look-up."""
        table = [-1] * self.num_ids
        for slot, g in enumerate(self.owned(coord)):
            if 0 <= g < self.num_ids:
                table[g] = slot
        return table

    def _inverse(self) -> list[Owners]:
        cached: list[Owners] | None = self.__dict__.get("_inverse_cache")
        if cached is None:
            pairs: list[list[tuple[int, int]]] = [[] for _ in range(self.num_ids)]
            for coord in range(self.num_coords):
                for slot, g in enumerate(self.owned(coord)):
                    if 0 <= g < self.num_ids:
                        pairs[g].append((coord, slot))
            cached = [tuple(p) for p in pairs]
            object.__setattr__(self, "_inverse_cache", cached)
        return cached


@dataclass(frozen=True)
class Linear(Strategy):
    name: str = field(init=False, default="linear")

    @property
    def exact(self) -> bool:
        return True

    def owned(self, coord: int) -> range:
        start = linear_start(self.num_ids, self.num_coords, coord)
        return range(start, start + linear_count(self.num_ids, self.num_coords, coord))

    def owners(self, g: int) -> Owners:
        if not 0 <= g < self.num_ids:
            return ()
        base, extra = divmod(self.num_ids, self.num_coords)
        if g < extra * (base + 1):
            coord = g // (base + 1)
        else:
            coord = extra + (g - extra * (base + 1)) // base
        return ((coord, g - linear_start(self.num_ids, self.num_coords, coord)),)


@dataclass(frozen=True)
class RoundRobin(Strategy):
    name: str = field(init=False, default="round_robin")

    @property
    def exact(self) -> bool:
        return True

    def owned(self, coord: int) -> range:
        return range(coord, self.num_ids, self.num_coords)

    def owners(self, g: int) -> Owners:
        return ((g % self.num_coords, g // self.num_coords),) if 0 <= g < self.num_ids else ()


@dataclass(frozen=True)
class VllmContiguous(Strategy):
    name: str = field(init=False, default="vllm_contiguous")

    def owned(self, coord: int) -> range:
        count = linear_count(self.num_ids, self.num_coords, coord)
        return range(coord * count, coord * count + count)


@dataclass(frozen=True)
class Table(Strategy):
    name: str = field(init=False, default="table")
    table: tuple[tuple[int, ...], ...] = ()

    def owned(self, coord: int) -> tuple[int, ...]:
        return self.table[coord]


@dataclass(frozen=True)
class Layers(Strategy):
    name: str = field(init=False, default="layers")
    sizes: tuple[int, ...] | None = None

    @property
    def exact(self) -> bool:
        # Explicit stage sizes are checked to add up to the ids.
        return True

    def stage_sizes(self) -> tuple[int, ...]:
        if self.sizes is not None:
            return self.sizes
        base, extra = divmod(self.num_ids, self.num_coords)
        sizes = [base] * self.num_coords
        for i in range(2, extra + 2):
            sizes[-i] += 1
        return tuple(sizes)

    def owned(self, coord: int) -> range:
        sizes = self.stage_sizes()
        start = sum(sizes[:coord])
        return range(start, start + sizes[coord])


@dataclass(frozen=True, slots=True)
class Part:
    """One part of a packed dim: its size and, optionally, its head count (for GQA kv replication)."""

    size: int
    heads: int | None = None


@dataclass(frozen=True)
class Shard(Strategy):
    """Equal chunks per part; a part with fewer heads than coordinates gives each head to P/heads of them."""

    name: str = field(init=False, default="shard")
    parts: tuple[Part, ...] = ()
    uneven: bool = False
    pad: int | None = None
    align: int | None = None

    @property
    def padded(self) -> int:
        """The size the coordinates split: `num_ids` rounded up to a multiple of `pad`."""
        if self.pad is None:
            return self.num_ids
        return -(-self.num_ids // self.pad) * self.pad

    @property
    def chunk(self) -> int:
        """Ids per coordinate, padding included (for a padded or aligned shard; else the largest share)."""
        if self.align is not None:
            return -(-self.num_ids // (self.num_coords * self.align)) * self.align
        return -(-self.padded // self.num_coords)

    @property
    def exact(self) -> bool:
        # Replicated kv heads (fewer heads than coordinates) are owned several times, as declared.
        return not any(part.heads is not None and part.heads < self.num_coords for part in self._parts())

    def _parts(self) -> tuple[Part, ...]:
        return self.parts or (Part(self.num_ids),)

    def owned(self, coord: int) -> list[int] | range:
        if self.pad is not None or self.align is not None:
            chunk = self.chunk
            return range(min(coord * chunk, self.num_ids), min((coord + 1) * chunk, self.num_ids))
        pieces: list[range] = []
        offset = 0
        for part in self._parts():
            pieces.append(self._chunk(part, coord, offset))
            offset += part.size
        if len(pieces) == 1:
            return pieces[0]
        return [i for piece in pieces for i in piece]

    def _chunk(self, part: Part, coord: int, offset: int) -> range:
        num = self.num_coords
        if part.heads is not None:
            head_size = part.size // part.heads
            if part.heads < num:
                # kv heads replicated: coordinate c holds head c // (P / heads).
                head = coord // (num // part.heads)
                return range(offset + head * head_size, offset + (head + 1) * head_size)
            # Whole heads per coordinate, as `linear` over the heads when they do not divide (opt-in).
            first = linear_start(part.heads, num, coord)
            count = linear_count(part.heads, num, coord)
            return range(offset + first * head_size, offset + (first + count) * head_size)
        start = linear_start(part.size, num, coord)
        return range(offset + start, offset + start + linear_count(part.size, num, coord))

    def problem(self) -> ShardProblem | None:
        """Why this split is not allowed, or None: sizes must divide unless `uneven` is set."""
        num = self.num_coords
        if self.align is not None:
            if self.num_ids % self.align:
                return ShardProblem(
                    f"size {self.num_ids} is not a whole number of blocks of {self.align}",
                    f"a multiple of {self.align}",
                    uneven_helps=False,
                )
            return None
        if self.pad is not None:
            if self.padded % num:
                return ShardProblem(
                    f"size {self.num_ids}, padded to a multiple of {self.pad} ({self.padded}), does not divide "
                    f"over {num} coordinates",
                    f"{num} coordinates dividing {self.padded}",
                    uneven_helps=False,
                )
            return None
        for part in self._parts():
            if part.heads is not None:
                if part.size % part.heads:
                    return ShardProblem(
                        f"part of size {part.size} is not a multiple of its {part.heads} heads",
                        f"a multiple of {part.heads}",
                        uneven_helps=False,
                    )
                if part.heads < num and num % part.heads:
                    return ShardProblem(
                        f"{num} coordinates cannot replicate {part.heads} heads evenly",
                        f"{num} coordinates a multiple of the {part.heads} heads (each head on the same number "
                        f"of coordinates), or a divisor of them",
                        uneven_helps=False,
                    )
                if part.heads >= num and part.heads % num and not self.uneven:
                    return ShardProblem(
                        f"{part.heads} heads do not divide over {num} coordinates",
                        f"a multiple of {num} heads",
                        uneven_helps=True,
                    )
            elif part.size % num and not self.uneven:
                return ShardProblem(
                    f"size {part.size} does not divide over {num} coordinates",
                    f"a multiple of {num}",
                    uneven_helps=True,
                )
        return None


class ShardProblem(NamedTuple):
    """Why a shard is refused: the finding, what would be allowed, and whether `uneven = true` would allow it."""

    found: str
    expected: str
    uneven_helps: bool


def make_strategy(
    name: str,
    *,
    num_ids: int,
    num_coords: int,
    table: Sequence[Sequence[int]] | None = None,
    sizes: Sequence[int] | None = None,
    parts: Sequence[Part] | None = None,
    uneven: bool = False,
    pad: int | None = None,
    align: int | None = None,
) -> Strategy:
    """Build a strategy by name; arguments are assumed valid (the compiler checks them)."""
    if name == "linear":
        return Linear(num_ids, num_coords)
    if name == "round_robin":
        return RoundRobin(num_ids, num_coords)
    if name == "vllm_contiguous":
        return VllmContiguous(num_ids, num_coords)
    if name == "table":
        return Table(num_ids, num_coords, table=tuple(tuple(ids) for ids in table or ()))
    if name == "layers":
        return Layers(num_ids, num_coords, sizes=tuple(sizes) if sizes is not None else None)
    if name == "shard":
        return Shard(num_ids, num_coords, parts=tuple(parts or ()), uneven=uneven, pad=pad, align=align)
    raise ValueError(f"unknown strategy {name!r}")
