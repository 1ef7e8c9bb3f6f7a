"""The quantization checks: every companion has its weight and is the shape its family's formula gives
(`quant-companion-shape`), no weight lacks a companion and no companion lacks its weight (`quant-orphan`), and a
companion is decided by its weight's rule (`quant-companion-rule`), so that no rank holds a weight without the
scales it needs. A cut inside a block, group or pack (`quant-misaligned`) is found where the companion is decided
(`ownership.compile.quant`).

Example:
    >>> from ownership.spec.quant import select_family
    >>> from ownership.loading.entries import KeyEntry
    >>> from ownership.lint.finding import LintReport
    >>> check = QuantCheck(select_family({"quant_method": "fp8", "weight_block_size": [128, 128]}))
    >>> check.note(KeyEntry("m.q_proj.weight", "F8_E4M3", (512, 256)), "q")
    >>> check.note(KeyEntry("m.q_proj.weight_scale_inv", "F32", (4, 3)), "q")
    >>> report = LintReport("r", "", "tp=2", 2)
    >>> check.report(report)
    >>> [f.data["expected"] for f in report.findings]
    [[4, 2]]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ownership.lint.finding import LintReport
from ownership.loading.entries import EntryLike
from ownership.spec.quant import Family

__all__ = ["QuantCheck"]

_EXAMPLES = 3


@dataclass
class QuantCheck:
    """The tensors of each module that the family names, gathered key by key."""

    family: Family
    modules: dict[str, dict[str, tuple[EntryLike, str]]] = field(default_factory=lambda: defaultdict(dict))

    def note(self, entry: EntryLike, rule: str) -> None:
        module, _, suffix = entry.key.rpartition(".")
        if self.family.tensor(suffix) is not None:
            self.modules[module][suffix] = (entry, rule)

    def report(self, report: LintReport) -> None:
        family = self.family
        primary = family.primary.suffix
        orphans: list[str] = []
        missing: dict[str, list[str]] = defaultdict(list)
        shapes: list[tuple[str, list[int], list[int], list[int]]] = []
        rules: list[tuple[str, str, str]] = []
        for module, tensors in self.modules.items():
            companions = [s for s in tensors if s != primary]
            if not companions and primary == "weight":
                continue  # a plain weight: this module is not quantized
            if not family.quantized(module) and primary == "weight":
                continue
            if primary not in tensors:
                orphans.extend(f"{module}.{s}" for s in companions)
                continue
            weight, weight_rule = tensors[primary]
            for tensor in family.tensors:
                if tensor.suffix not in tensors and not tensor.optional:
                    missing[tensor.suffix].append(f"{module}.{primary}")
            if weight.shape is None:
                continue
            logical = family.logical_shape(family.primary, weight.shape)
            for suffix, (entry, rule) in tensors.items():
                spec = family.tensor(suffix)
                assert spec is not None
                formula = family.expected_shape(spec, logical)
                if entry.shape is not None and formula is not None and tuple(entry.shape) != formula:
                    shapes.append((entry.key, list(entry.shape), list(formula), list(weight.shape)))
                if rule != weight_rule:
                    rules.append((entry.key, rule, weight_rule))
        name = family.name
        if orphans:
            report.add(
                "quant-orphan",
                f"{_count(len(orphans), 'companion')} with no {primary!r} beside {'it' if len(orphans) == 1 else 'them'} "
                f"({name})",
                keys=orphans[:_EXAMPLES],
                fix=f"check the checkpoint: a {name} layer stores its values in {primary!r}",
                data={"num_keys": len(orphans)},
            )
        for suffix, keys in missing.items():
            report.add(
                "quant-orphan",
                f"{_count(len(keys), 'weight')} with no {suffix!r} beside {'it' if len(keys) == 1 else 'them'} ({name})",
                keys=keys[:_EXAMPLES],
                fix=f"check the checkpoint against its quantization_config ({name} stores {suffix!r} for every "
                "quantized layer)",
                data={"num_keys": len(keys), "missing": suffix},
            )
        for key, found, expected, base in shapes[:_EXAMPLES]:
            report.add(
                "quant-companion-shape",
                f"shape {found}, where {name} gives {expected} for its {primary!r} of {base}",
                keys=[key],
                fix="check the quantization_config (block, group and pack sizes) against the checkpoint",
                data={"found": found, "expected": expected, "num_keys": len(shapes)},
            )
        for key, rule, weight_rule in rules[:_EXAMPLES]:
            report.add(
                "quant-companion-rule",
                f"decided by rule {rule!r}, but its weight by {weight_rule!r}",
                rule=rule,
                keys=[key],
                fix=f"let the rule for the weight decide its companions: narrow {rule!r} so it does not match them",
                data={"num_keys": len(rules)},
            )


def _count(n: int, noun: str) -> str:
    return f"1 {noun}" if n == 1 else f"{n} {noun}s"
