"""A quantized weight's companions follow its placement, in block, group and pack units.

A `CompanionRule` decides the tensors a quantization family stores for a linear layer `X` (`X.qweight`,
`X.scales`, `X.weight_scale_inv`, ...) with the placement of the rule for `X.weight`: the same captures and pins
(experts, layers), and, for each logical dim the rule cuts (`out` for a column-parallel layer, `in` for a
row-parallel one), the same cut in the tensor's units. A rank holding rows `[s, e)` of the weight holds
scale rows `[s/128, ceil(e/128))` of block FP8, packed rows `[s/8, e/8)` of GPTQ's `qweight`, the whole of a
scalar. A cut that splits a unit is an error (`quant-misaligned`) with the arithmetic and the legal sizes of the
axis, as vLLM's `validate_fp8_block_shape` refuses it.

Example:
    >>> from ownership import load_ruleset
    >>> quant = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    >>> bound = load_ruleset("llama").bind(mesh="tp=2", config={"num_hidden_layers": 1, "num_attention_heads": 4,
    ...     "num_key_value_heads": 4, "quantization_config": quant})
    >>> [d.selection for _, d in bound.owners("model.layers.0.mlp.down_proj.weight_scale_inv", (8, 4))]
    [(None, ((0, 2, 1),)), (None, ((2, 4, 1),))]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ownership.compile.bind import BoundRule, compose_runs
from ownership.errors import DecisionError
from ownership.placement.mesh import Mesh
from ownership.placement.selection import DimSelection, Run, Selection, normalize_selection
from ownership.placement.strategy import Strategy
from ownership.spec.program import AnalyzedRule
from ownership.spec.quant import Family, QuantTensor

__all__ = ["CompanionRule"]

_AXES = ("out", "in")


class CompanionRule(BoundRule):
    """The rule for `X.weight`, deciding `X`'s quantization companions (and its packed weight)."""

    companion = True

    def __init__(
        self,
        rule: AnalyzedRule,
        *,
        base: BoundRule,
        family: Family,
        mesh: Mesh,
        params: Mapping[str, Any],
        source: str,
    ) -> None:
        super().__init__(rule, mesh=mesh, params=params, source=source)
        self.base = base
        self.family = family
        self.pads = False
        self._companion_cache: dict[tuple[str, tuple[int, ...], tuple[int, ...]], Selection] = {}

    def tensor_of(self, key: str) -> QuantTensor | None:
        """The family's tensor a key is (by its last segment); None for an unquantized module's plain weight."""
        module, _, suffix = key.rpartition(".")
        if suffix == "weight" and not self.family.quantized(module):
            return None
        return self.family.tensor(suffix)

    def local_key(self, key: str, captures: Mapping[str, int | str], slots: Mapping[str, int]) -> str:
        if self.rule.rename is None:
            return key
        suffix = key.rpartition(".")[2]
        local = super().local_key(key, captures, slots)
        return local[: -len("weight")] + suffix if local.endswith(".weight") else f"{local}.{suffix}"

    def selection(self, shape: tuple[int, ...] | None, dim_coords: tuple[int, ...], key: str) -> Selection:
        tensor = self.tensor_of(key)
        if tensor is None:
            return self.base.selection(shape, dim_coords, key)
        if tensor.scalar or not self.cuts:
            return None
        if shape is None:
            return super().selection(None, dim_coords, key)  # shape-needed, naming the axes
        cache_key = (tensor.suffix, shape, dim_coords)
        cached = self._companion_cache.get(cache_key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        selection = self._companion_selection(tensor, shape, dim_coords, key)
        self._companion_cache[cache_key] = selection
        return selection

    def dim_strategies(self, shape: tuple[int, ...], key: str) -> tuple[tuple[int, int, Strategy], ...]:
        """The weight's strategies, over the logical sizes this tensor gives (a packed weight's, exactly)."""
        tensor = self.tensor_of(key)
        if tensor is None:
            return self.base.dim_strategies(shape, key)
        logical = self.family.logical_shape(tensor, shape)
        if len(logical) < 2:
            return ()
        return self.base.dim_strategies((logical["out"], logical["in"]), key)

    def _companion_selection(
        self, tensor: QuantTensor, shape: tuple[int, ...], dim_coords: tuple[int, ...], key: str
    ) -> Selection:
        if len(shape) != len(tensor.dims):
            raise DecisionError(
                f"a {self.family.name} {tensor.suffix!r} has {len(tensor.dims)} dims, this tensor {len(shape)}",
                source=self.source,
                key=key,
                rule=self.id,
                found=f"shape {list(shape)}",
                expected=f"dims {_dims_text(tensor)}",
                fix="check the checkpoint's quantization_config against its tensors",
                code="quant-companion-shape",
            )
        units = self.family.units
        # Each cut logical dim: its runs, over the logical size this tensor's dim (in its unit) gives.
        runs: dict[int, tuple[tuple[Run, ...], int, int, str]] = {}
        for j, (axis, _) in enumerate(tensor.dims):
            if axis is None or j in tensor.whole:
                continue
            unit = tensor.unit(j, units)
            if unit <= 0:
                continue  # one unit over the whole dim (GPTQ channelwise): never cut
            logical = shape[j] * unit
            found = self._logical_runs(_AXES.index(axis), logical, dim_coords, key)
            if found is not None:
                runs[j] = (found[0], unit, logical, found[1])
        per_dim: list[DimSelection] = []
        for j, size in enumerate(shape):
            if j not in runs:
                per_dim.append(None)
                continue
            logical_runs, unit, logical, mesh_axis = runs[j]
            per_dim.append(
                tuple(
                    self._in_units(run, unit, logical, size, tensor, j, key, mesh_axis=mesh_axis)
                    for run in logical_runs
                )
            )
        return normalize_selection(per_dim, shape)

    def _logical_runs(
        self, d: int, size: int, dim_coords: tuple[int, ...], key: str
    ) -> tuple[tuple[Run, ...], str] | None:
        """The runs of logical dim `d` (0 = out, 1 = in) of a weight whose dim `d` has `size`, on these
        coordinates, and the mesh axis that cuts it; None when the rule cuts nothing there."""
        base = self.base
        layout = base.rule.layout
        if layout is None:
            return None
        placed = [(i, dim) for i, dim in enumerate(base.dims) if layout.where(dim.name)[0] == d]
        if not placed or all(self.mesh.size(dim.axis) == 1 for _, dim in placed):
            return None
        # Model sizes are not checked here: a rounded-up block count need not give the weight's exact size.
        known = {name: v for name, v in base.known_sizes.items() if name not in base.size_origins}
        factors = layout.dims[d]
        sizes = layout._resolve_dim(factors, size, known=known, key=key, rule=self.id, source=self.source)
        owned: list[Sequence[int] | None] = [None] * len(factors)
        for i, dim in placed:
            f = factors.index(dim.name)
            strategy = base._dim_strategy(dim, sizes[f], key)
            owned[f] = strategy.owned(dim_coords[i])
        return compose_runs(sizes, owned), placed[0][1].axis

    def _in_units(
        self,
        run: Run,
        unit: int,
        logical: int,
        size: int,
        tensor: QuantTensor,
        j: int,
        key: str,
        *,
        mesh_axis: str,
    ) -> Run:
        start, stop, step = run
        if step != 1 or start % unit or (stop % unit and stop != logical):
            axis = tensor.dims[j][0]
            what = tensor.dims[j][1]
            name = what.split("_")[0] if isinstance(what, str) else "unit"
            coords = self.mesh.size(mesh_axis)
            # Even cuts: the sizes of the axis that leave every rank whole units.
            legal = [n for n in range(1, 129) if size % n == 0]
            raise DecisionError(
                f"{mesh_axis}={coords} cuts {axis} ({size} {name}s of {unit}) inside a {name}",
                source=self.source,
                key=key,
                rule=self.id,
                found=f"{size} {name}s of {unit} along {axis}, {mesh_axis}={coords} -> "
                f"{(stop - start) / unit:g} {name}s on a rank",
                expected=f"whole {name}s on every rank",
                fix=f"use {mesh_axis} = "
                + (", ".join(map(str, legal)) if legal else "1")
                + f" (sizes that divide its {size} {name}s), or a checkpoint quantized with smaller {name}s",
                code="quant-misaligned",
            )
        return (start // unit, min(-(-stop // unit), size), 1)


_MISSING = object()


def _dims_text(tensor: QuantTensor) -> str:
    parts = []
    for axis, unit in tensor.dims:
        parts.append(str(unit) if axis is None else axis if unit == 1 else f"{axis}/{unit}")
    return "[" + ", ".join(parts) + "]"
