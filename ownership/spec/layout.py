"""Tensor layouts in einops notation: named dims, and factors of a dim in parentheses, outermost first.

`(expert r) in` says dim 0 is `expert` major and `r` minor (PEFT's fused `lora_A`), `out (r expert)` that dim 1
has the expert varying fastest (PEFT's fused `lora_B`). Factor sizes come from the rule (placement sizes and
`sizes`); a single-name dim takes its size from the shape, and one unknown factor per dim is inferred by
division. A shape that does not fit is a `DecisionError` naming the key.

Example:
    >>> layout = parse_layout("(expert r) in")
    >>> layout.dims
    (('expert', 'r'), ('in',))
    >>> layout.resolve((24, 32), known={"expert": 6}, key="k")
    ((6, 4), (32,))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ownership.errors import DecisionError, RulesetError

__all__ = ["Layout", "parse_layout"]

_TOKEN = re.compile(r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<bad>\S))")


@dataclass(frozen=True, slots=True)
class Layout:
    """Dims of a tensor, each a tuple of factor names (outermost first)."""

    source: str
    dims: tuple[tuple[str, ...], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every dim and factor name, in order."""
        return tuple(name for dim in self.dims for name in dim)

    def where(self, name: str) -> tuple[int, int]:
        """(dim, factor position) of a name."""
        for d, dim in enumerate(self.dims):
            if name in dim:
                return d, dim.index(name)
        raise KeyError(name)

    def resolve(
        self,
        shape: Sequence[int],
        *,
        known: Mapping[str, int],
        key: str,
        rule: str | None = None,
        source: str | None = None,
        origins: Mapping[str, str] | None = None,
    ) -> tuple[tuple[int, ...], ...]:
        """Factor sizes for a tensor of `shape`; `known` gives sizes of some factors, `origins` where a known size
        comes from (a param such as `hidden_size`), for the error when the shape does not fit it."""
        if len(shape) != len(self.dims):
            raise DecisionError(
                f"layout {self.source!r} has {len(self.dims)} dims but the tensor has {len(shape)}",
                source=source,
                key=key,
                rule=rule,
                found=f"shape {list(shape)}",
                expected=f"{len(self.dims)} dims",
                fix="fix the rule's layout, or its pattern so it only matches tensors with that many dims",
                code="layout-mismatch",
            )
        sizes: list[tuple[int, ...]] = []
        for d, (dim, size) in enumerate(zip(self.dims, shape, strict=True)):
            try:
                sizes.append(self._resolve_dim(dim, size, known=known, key=key, rule=rule, source=source))
            except DecisionError as error:
                raise self._explained(error, d, dim, size, known, origins or {}, shape) from None
        return tuple(sizes)

    def _explained(
        self,
        error: DecisionError,
        d: int,
        dim: tuple[str, ...],
        size: int,
        known: Mapping[str, int],
        origins: Mapping[str, str],
        shape: Sequence[int],
    ) -> DecisionError:
        """A dim that does not fit a model size (from the config) is most often a tensor stored in another
        orientation: say which dim, which size and where it comes from."""
        bound = [
            name for name in dim if name in origins and name in known and origins[name] != str(known[name])
        ]
        if not bound or error.code != "layout-mismatch" or "cannot infer" in error.message:
            return error
        where = ", ".join(f"{name} = {origins[name]} = {known[name]}" for name in bound)
        return DecisionError(
            f"dim {d} of the tensor is ({' '.join(dim)}) in layout {self.source!r}, but its size is not the "
            f"model's",
            key=error.key,
            rule=error.rule,
            source=error.source,
            found=f"shape {list(shape)}: size {size} at dim {d}",
            expected=f"{_describe(dim, known)} at dim {d} ({where})",
            fix="the tensor is stored in another orientation than the rule's layout (transposed?), or is of another "
            "model: use the ruleset of the checkpoint's model_type, give the rule a layout for this orientation, "
            "or check the config",
            code="layout-mismatch",
        )

    def _resolve_dim(
        self,
        dim: tuple[str, ...],
        size: int,
        *,
        known: Mapping[str, int],
        key: str,
        rule: str | None,
        source: str | None,
    ) -> tuple[int, ...]:
        unknown = [name for name in dim if name not in known]
        if len(dim) == 1:
            name = dim[0]
            if name in known and known[name] != size:
                raise self._mismatch(dim, size, f"{name}={known[name]}", key=key, rule=rule, source=source)
            return (size,)
        if len(unknown) > 1:
            raise DecisionError(
                f"cannot infer the sizes of {' and '.join(unknown)} in ({' '.join(dim)})",
                source=source,
                code="layout-mismatch",
                key=key,
                rule=rule,
                found=f"dim of size {size}",
                expected="at most one factor of unknown size per dim",
                fix=f"give sizes for all but one of them in the rule's `sizes` (e.g. sizes = {{ {unknown[0]} = ... }})",
            )
        product = 1
        for name in dim:
            if name in known:
                product *= known[name]
        if unknown:
            if product == 0 or size % product:
                raise self._mismatch(dim, size, _describe(dim, known), key=key, rule=rule, source=source)
            inferred = dict(known)
            inferred[unknown[0]] = size // product
            return tuple(inferred[name] for name in dim)
        if product != size:
            raise self._mismatch(dim, size, _describe(dim, known), key=key, rule=rule, source=source)
        return tuple(known[name] for name in dim)

    def _mismatch(
        self, dim: tuple[str, ...], size: int, what: str, *, key: str, rule: str | None, source: str | None
    ) -> DecisionError:
        return DecisionError(
            f"dim ({' '.join(dim)}) of layout {self.source!r} does not fit the shape",
            key=key,
            rule=rule,
            found=f"size {size}",
            expected=f"a multiple of {what}" if len(dim) > 1 else what,
            fix="check the params (e.g. num_experts) against the checkpoint, or the rule's layout",
            source=source,
            code="layout-mismatch",
        )


def _describe(dim: tuple[str, ...], known: Mapping[str, int]) -> str:
    return " * ".join(f"{name}={known[name]}" for name in dim if name in known)


def parse_layout(text: str, *, rule: str | None = None, source: str | None = None) -> Layout:
    """Parse `(a b) c` notation; names are identifiers, parentheses do not nest, names are unique."""
    dims: list[tuple[str, ...]] = []
    group: list[str] | None = None
    seen: set[str] = set()

    def fail(message: str, pos: int, fix: str) -> RulesetError:
        return RulesetError(
            f"bad layout at column {pos + 1}: {message}",
            source=source,
            rule=rule,
            fix=fix,
            code="layout-error",
            detail=f"    {text}\n    {' ' * pos}^",
        )

    for match in _TOKEN.finditer(text):
        pos = match.start(match.lastgroup or 0)
        if match.group("bad"):
            raise fail(f"unexpected {match.group('bad')!r}", pos, "use names, spaces and ( )")
        if match.group("open"):
            if group is not None:
                raise fail(
                    "nested '('", pos, "parentheses do not nest: list the factors of a dim in one group"
                )
            group = []
        elif match.group("close"):
            if group is None:
                raise fail("')' without '('", pos, "open the group first")
            if not group:
                raise fail("empty group", pos, "put at least one name inside ( )")
            dims.append(tuple(group))
            group = None
        else:
            name = match.group("name")
            if name in seen:
                raise fail(f"name {name!r} appears twice", pos, "give each dim and factor its own name")
            seen.add(name)
            if group is None:
                dims.append((name,))
            else:
                group.append(name)
    if group is not None:
        raise fail("'(' without ')'", len(text), "close the group")
    if not dims:
        raise fail("empty layout", 0, "name each dim, e.g. 'out in'")
    return Layout(source=text, dims=tuple(dims))
