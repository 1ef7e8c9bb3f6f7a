"""Quantization families: the tensors a quantized linear layer is stored as, and how each relates to the layer's
logical weight `[out, in]`.

A family (one TOML file under `rules/quantization/`) says when it applies (`when`, over `config.json`'s
`quantization_config`), its units (block, group and pack sizes, read from that config), and its tensors, each by
key suffix: `qweight` of GPTQ is `["in/pack", "out"]` (stored (in, out), eight values an int32 along in),
`weight_scale_inv` of block FP8 is `["out/block_out", "in/block_in"]` (one scale per block, partial blocks
rounded up). A rule that decides `X.weight` then decides its family's `X.qweight`, `X.scales`, ... with the same
placement, in those units (`ownership.compile.quant`), so one ruleset serves every quantized release of a model.

Example:
    >>> family = select_family({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    >>> family.name, family.units, [t.suffix for t in family.tensors]
    ('fp8-block', {'block_out': 128, 'block_in': 128}, ['weight', 'weight_scale_inv'])
    >>> family.tensor("weight_scale_inv").dims
    (('out', 'block_out'), ('in', 'block_in'))
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ownership.errors import RulesetError
from ownership.spec.builtin import builtin_dir
from ownership.spec.schema import StrictModel

__all__ = [
    "Family",
    "QuantTensor",
    "family_names",
    "load_families",
    "quantization_config",
    "select_family",
]

Axis = str
"""`out` or `in`: a dim of the layer's logical weight."""


class TensorSpec(StrictModel):
    """One stored tensor of a family, by key suffix."""

    suffix: str
    dims: list[str] = Field(
        description="Each stored dim: `out` or `in` (a logical dim), `out/UNIT` or `in/UNIT` (in units of a "
        "block, group or pack; partial units round up), or an int (a dim of that size, never cut). Empty: a scalar, "
        "needed whole by every rank that holds any of the weight."
    )
    whole: list[int] = Field(
        default_factory=list, description="Stored dims never cut, whatever the weight's cut."
    )
    dtype: str | None = None
    optional: bool = Field(
        default=False, description="Not every quantized layer has it (zero points of symmetric groups)."
    )


class FamilySpec(StrictModel):
    name: str
    doc: str = ""
    when: dict[str, Any] | list[dict[str, Any]]
    units: dict[str, int | str] = Field(default_factory=dict)
    tensor: list[TensorSpec] = Field(min_length=1)


@dataclass(frozen=True)
class QuantTensor:
    """A family's tensor with its units resolved: `dims[j]` is (logical axis, unit) or (None, size) for a dim
    of fixed size; a unit of 0 spans the whole logical dim (GPTQ's channelwise group)."""

    suffix: str
    dims: tuple[tuple[Axis | None, int | str], ...]
    whole: frozenset[int]
    dtype: str | None
    optional: bool

    @property
    def scalar(self) -> bool:
        return not self.dims

    def unit(self, j: int, units: Mapping[str, int]) -> int:
        unit = self.dims[j][1]
        return unit if isinstance(unit, int) else units[unit]


@dataclass(frozen=True)
class Family:
    """A family with its units read from one checkpoint's quantization_config."""

    name: str
    doc: str
    units: dict[str, int]
    tensors: tuple[QuantTensor, ...]
    ignore: tuple[str, ...] = ()
    """Modules the config leaves unquantized (`ignore`, `modules_to_not_convert`)."""

    def tensor(self, suffix: str) -> QuantTensor | None:
        for tensor in self.tensors:
            if tensor.suffix == suffix:
                return tensor
        return None

    @property
    def primary(self) -> QuantTensor:
        """The tensor that holds the weight's values (the first): `weight`, `qweight`, `weight_packed`."""
        return self.tensors[0]

    @property
    def companion_suffixes(self) -> tuple[str, ...]:
        """Suffixes a rule for `X.weight` also decides: every tensor but a plain `weight` of the logical shape."""
        return tuple(t.suffix for t in self.tensors if not (t.suffix == "weight" and _logical(t)))

    def quantized(self, module: str) -> bool:
        """Whether the config quantizes `module` (a key without its last segment)."""
        return not any(_ignores(entry, module) for entry in self.ignore)

    def logical_shape(self, tensor: QuantTensor, shape: Sequence[int]) -> dict[Axis, int]:
        """The logical `[out, in]` sizes a stored tensor gives exactly (packs; not rounded-up blocks)."""
        found: dict[Axis, int] = {}
        for j, (axis, _) in enumerate(tensor.dims):
            if axis is not None and j < len(shape):
                unit = tensor.unit(j, self.units)
                if unit == 1 or tensor.suffix == self.primary.suffix:
                    found.setdefault(axis, shape[j] * unit)
        return found

    def expected_shape(self, tensor: QuantTensor, logical: Mapping[Axis, int]) -> tuple[int, ...] | None:
        """A tensor's shape for a weight of logical sizes `logical` (None when one of them is unknown)."""
        out = []
        for j, (axis, unit) in enumerate(tensor.dims):
            if axis is None:
                out.append(int(unit))
                continue
            if axis not in logical:
                return None
            size = tensor.unit(j, self.units)
            out.append(1 if size <= 0 else -(-logical[axis] // size))
        return tuple(out)


def _logical(tensor: QuantTensor) -> bool:
    return tensor.dims == (("out", 1), ("in", 1))


def _ignores(entry: str, module: str) -> bool:
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], module) is not None
    if "*" in entry or "?" in entry:
        return fnmatch.fnmatchcase(module, entry) or fnmatch.fnmatchcase(module, f"{entry}.*")
    return module == entry or module.startswith(entry + ".") or module.endswith("." + entry)


def quantization_config(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The `quantization_config` of a config (a multimodal one's top level first, then its text section)."""
    if not config:
        return None
    for section in (config, config.get("text_config")):
        if isinstance(section, Mapping) and isinstance(section.get("quantization_config"), Mapping):
            found: Mapping[str, Any] = section["quantization_config"]
            return found
    return None


@lru_cache(maxsize=1)
def _specs() -> tuple[FamilySpec, ...]:
    folder = builtin_dir() / "quantization"
    specs = []
    for path in sorted(folder.glob("*.toml")):
        specs.append(_read(path))
    return tuple(specs)


def _read(path: Path) -> FamilySpec:
    source = f"quantization/{path.name} (built-in)"
    try:
        return FamilySpec.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (ValidationError, tomllib.TOMLDecodeError) as error:
        # Built-in files, checked by the tests: a failure here is a broken installation.
        raise RulesetError(
            "cannot read a built-in quantization family", source=source, found=str(error)
        ) from None


def family_names() -> list[str]:
    """The built-in quantization families."""
    return [spec.name for spec in _specs()]


def load_families() -> tuple[FamilySpec, ...]:
    """Every built-in family's spec, as written."""
    return _specs()


def select_family(quant: Mapping[str, Any] | None, *, source: str = "the config") -> Family | None:
    """The family a `quantization_config` describes, with its units; None for an unquantized checkpoint or one
    no family describes (the rules' own tensors then stand alone: GPT-OSS's MXFP4 blocks)."""
    if not quant:
        return None
    for spec in _specs():
        conditions = spec.when if isinstance(spec.when, list) else [spec.when]
        if any(all(_holds(quant, path, value) for path, value in cond.items()) for cond in conditions):
            return _resolve(spec, quant, source=source)
    return None


def _values(node: Any, parts: Sequence[str]) -> list[Any]:
    """Every value at a dotted path; `*` is any key of a mapping, a number an index of a list."""
    if not parts:
        return [node]
    head, rest = parts[0], parts[1:]
    if isinstance(node, Mapping):
        if head == "*":
            return [v for child in node.values() for v in _values(child, rest)]
        return _values(node[head], rest) if head in node else []
    if isinstance(node, list) and head.isdigit() and int(head) < len(node):
        return _values(node[int(head)], rest)
    return []


def _holds(quant: Mapping[str, Any], path: str, wanted: Any) -> bool:
    found = _values(quant, path.split("."))
    if wanted == "*":
        return any(v is not None for v in found)
    if wanted == "-":
        return not any(v is not None for v in found)
    options = wanted if isinstance(wanted, list) else [wanted]
    return any(v in options for v in found) or ("-" in options and not found)


def _resolve(spec: FamilySpec, quant: Mapping[str, Any], *, source: str) -> Family:
    units: dict[str, int] = {}
    for name, ref in spec.units.items():
        units[name] = _unit(ref, quant, family=spec.name, name=name, source=source)
    tensors = []
    for tensor in spec.tensor:
        dims: list[tuple[Axis | None, int | str]] = []
        for text in tensor.dims:
            axis, _, unit = text.partition("/")
            if axis.isdigit():
                dims.append((None, int(axis)))
            elif axis in ("out", "in"):
                dims.append((axis, int(unit) if unit.isdigit() else unit or 1))
            else:
                raise RulesetError(
                    f"quantization family {spec.name!r}: tensor {tensor.suffix!r} has a dim {text!r}",
                    source=source,
                    expected="out, in, out/UNIT, in/UNIT or an int",
                    code="schema",
                )
        tensors.append(
            QuantTensor(tensor.suffix, tuple(dims), frozenset(tensor.whole), tensor.dtype, tensor.optional)
        )
    ignore = tuple(
        str(entry)
        for key in ("ignore", "modules_to_not_convert")
        for entry in (quant.get(key) or [])
        if isinstance(entry, str)
    )
    return Family(spec.name, spec.doc, units, tuple(tensors), ignore)


def _unit(ref: int | str, quant: Mapping[str, Any], *, family: str, name: str, source: str) -> int:
    """A unit: an int, a dotted path into the quantization_config, or `INT/path` (32/bits: values per int32)."""
    if isinstance(ref, int):
        return ref
    numerator, _, path = ref.partition("/") if "/" in ref and ref.split("/")[0].isdigit() else ("", "", ref)
    found = [v for v in _values(quant, path.split(".")) if isinstance(v, int) and not isinstance(v, bool)]
    if not found or (numerator and found[0] <= 0):
        raise RulesetError(
            f"quantization family {family!r} needs {name} from quantization_config.{path}",
            source=source,
            found="nothing there" if not found else repr(found[0]),
            expected="an integer",
            fix="check the checkpoint's quantization_config",
            code="quant-config",
        )
    value = found[0]
    return int(numerator) // value if numerator else (value if value > 0 else 0)
