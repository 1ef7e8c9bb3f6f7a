"""Which meshes of a given world size a checkpoint can be loaded on: every factorization of the world size into
the ruleset's axes, linted, with the reason each illegal one fails and the bytes per rank of each legal one.

A mesh is legal when lint finds no error: every key decided, every cut whole in its heads, blocks, groups and
packs, no silent replication. It is the question to ask before launching a job of N GPUs on a quantized release.

Example:
    >>> from ownership.loading.entries import KeyEntry
    >>> keys = [KeyEntry(f"m.layers.0.mlp.experts.{e}.w1.weight", "F32", (8, 8)) for e in range(4)]
    >>> found = legal_meshes("vllm-ep-lora", keys, world=8, params={"num_experts": 4})
    >>> [(v.mesh, v.legal) for v in found]
    [('ep=8', True)]
    >>> found[0].reason
    'empty-coordinate: ep coordinates 4, 5, 6, 7 hold no expert (linear split of 4 experts over ep=8)'
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ownership.lint.run import lint
from ownership.loading.entries import Source, entries_from
from ownership.ruleset import RulesetLike, resolve_ruleset
from ownership.spec.params import merge_configs

__all__ = ["MeshVerdict", "factorizations", "legal_meshes"]


@dataclass(frozen=True)
class MeshVerdict:
    """One mesh of the world size: whether it is legal, why not, and its bytes per rank."""

    mesh: str
    legal: bool
    reason: str
    """Why it is illegal (its first error), or a legal mesh's first warning; "" for a clean mesh."""
    max_bytes: int | None
    max_over_mean: float | None


def factorizations(world: int, axes: Sequence[str]) -> Iterator[dict[str, int]]:
    """Every way of writing `world` as a product of sizes of `axes`, in order (sizes of 1 left out of the mesh,
    but at least one axis kept).

    Example:
        >>> [",".join(f"{a}={n}" for a, n in m.items()) for m in factorizations(4, ["pp", "tp"])]
        ['tp=4', 'pp=2,tp=2', 'pp=4']
    """

    def walk(rest: int, i: int) -> Iterator[list[int]]:
        if i == len(axes) - 1:
            yield [rest]
            return
        for size in range(1, rest + 1):
            if rest % size == 0:
                for tail in walk(rest // size, i + 1):
                    yield [size, *tail]

    for sizes in walk(world, 0):
        mesh = {axis: n for axis, n in zip(axes, sizes, strict=True) if n > 1}
        yield mesh or {axes[-1]: 1}


def legal_meshes(
    ruleset: RulesetLike,
    source: Source,
    *,
    world: int,
    params: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    force_config: bool = False,
) -> list[MeshVerdict]:
    """Lint `source` at every mesh of `world` ranks over the ruleset's axes (`factorizations`)."""
    entries, own = entries_from(source)
    merged = merge_configs(own, config, force=force_config)
    found = resolve_ruleset(
        ruleset, merged, source=str(source) if isinstance(source, str | os.PathLike) else ""
    )
    out = []
    for axes in factorizations(world, found.spec.axes):
        text = ",".join(f"{axis}={size}" for axis, size in axes.items())
        report = lint(found, entries, mesh=text, params=params, config=merged, force_config=True)
        problems = [f for f in report.findings if f.level == "error"] or [
            f for f in report.findings if f.level == "warning"
        ]
        balance = next((f for f in report.findings if f.check == "byte-balance"), None)
        per_rank = balance.data.get("bytes_per_rank") if balance is not None else None
        out.append(
            MeshVerdict(
                mesh=text,
                legal=report.exit_code == 0,
                reason=f"{problems[0].check}: {problems[0].message}" if problems else "",
                max_bytes=max(per_rank) if per_rank else None,
                max_over_mean=balance.data.get("max_over_mean") if balance is not None else None,
            )
        )
    return out
