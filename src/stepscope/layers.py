"""Layers: the shallow and deep bands of a model's layers, and the one parser and resolver of layer lists.

Bands (the method's defaults): shallow = the bottom quarter `[0, L//4)`, deep = the top quarter
`[L - L//4, L)`, at least one layer each; deep_half = the top half `[L - L//2, L)`, at least two layers (the
span of the decay slope).

Layer specs, one set of rules for every command and the library:
- `all` (or an empty string): every layer (`None`);
- an index: `3`; a negative index counts from the end: `-1` is the last layer;
- an inclusive range: `0-7`, `-4--1`; a range must not run backwards once both ends are resolved;
- a band name: `shallow`, `deep`, `deep_half`;
- any comma-separated mix of those: `0-3,deep`.
Indices outside the model, a backwards range or an unknown word are errors that name the option.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import StepscopeError

BANDS = ("shallow", "deep", "deep_half")
_ITEM = re.compile(r"(-?\d+)(?:-(-?\d+))?")


def layer_bands(num_layers: int) -> dict[str, range]:
    """The model-layer ranges of the shallow quarter, the deep quarter and the deep half."""
    L = int(num_layers)
    if L < 1:
        raise StepscopeError(f"the model has {num_layers} layers")
    q = max(1, L // 4)
    h = min(L, max(2, L // 2))
    return {"shallow": range(0, min(q, L)), "deep": range(max(0, L - q), L), "deep_half": range(L - h, L)}


def _resolve_index(i: int, num_layers: int, what: str, item: str) -> int:
    j = i + num_layers if i < 0 else i
    if not 0 <= j < num_layers:
        raise StepscopeError(f"{what}: {item} is out of range (the model has {num_layers} layers)")
    return j


def parse_layers(spec: str | int | Sequence[int] | None, num_layers: int | None = None, *,
                 what: str = "layers") -> list[int] | None:
    """A layer spec (see the module docstring) as a list of layer indices, or None for every layer.

    With `num_layers`: sorted unique indices in [0, num_layers). Without it (the model is not known yet), the
    spec is checked and its indices returned as written (negative ones kept, to be resolved later by
    `resolve_layers`); band names and ranges whose ends have different signs need `num_layers`.
    A list of ints is accepted as a spec too (then only resolved).
    """
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise StepscopeError(f"{what}: cannot read {spec!r}")
    if isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, str):
        items = list(spec)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise StepscopeError(f"{what} must be layer indices, got {spec!r}")
        return resolve_layers(items, num_layers, what=what) if num_layers is not None else [int(i) for i in items]
    text = spec.strip().lower()
    if text in ("", "all"):
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in BANDS:
            if num_layers is None:
                raise StepscopeError(f"{what}: {part!r} needs the model's number of layers")
            out.extend(layer_bands(num_layers)[part])
            continue
        m = _ITEM.fullmatch(part)
        if not m:
            raise StepscopeError(f"{what}: cannot read {part!r} (use all, shallow, deep, 3, 0-7, -4--1, or a "
                                 "comma-separated mix)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if num_layers is not None:
            a, b = _resolve_index(a, num_layers, what, part), _resolve_index(b, num_layers, what, part)
        elif (a < 0) != (b < 0):
            raise StepscopeError(f"{what}: {part!r} mixes an index from the start and one from the end; "
                                 "write both ends the same way")
        if a > b:
            raise StepscopeError(f"{what}: the range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    if not out:
        raise StepscopeError(f"{what}: no layers in {spec!r}")
    return sorted(set(out)) if num_layers is not None else list(dict.fromkeys(out))


def resolve_layers(layers: Sequence[int] | None, num_layers: int, *, what: str = "layers",
                   default: Sequence[int] | range | None = None) -> list[int]:
    """Layer indices (negative ones from the end) as sorted unique indices of a model with `num_layers` layers.

    None gives `default` (every layer when that is None too); an empty list is an error.
    """
    if num_layers < 1:
        raise StepscopeError(f"the model has {num_layers} layers")
    if layers is None:
        return list(range(num_layers)) if default is None else sorted(set(default))
    out = {_resolve_index(int(i), num_layers, what, str(i)) for i in layers}
    if not out:
        raise StepscopeError(f"{what}: no layers selected")
    return sorted(out)
