"""The Diagnosis of one trace: its per-layer metrics and scores, and (against a baseline) z-scores, flags and a
verdict; `diagnose(...)` builds it from a saliency result, its folder, or bare maps.

Pairing key of a trace (for comparisons): meta "problem_id" if set, else a hash of the whitespace-normalized
problem text (meta "problem", else "question"), else meta "id". Ids alone rarely pair: they usually name the
model too (e.g. "gsm8k-209-qwq-32b").
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import StepscopeError
from ..segment import KINDS
from .metrics import (
    JSON_VERSION,
    METRICS,
    SCORES,
    SHORT_NAMES,
    check_inputs,
    compute_metrics,
    compute_scores,
    layer_groups,
)
from .profile import Profile, apply_baseline


def problem_key(meta: dict) -> str | None:
    """The pairing key of a trace: meta problem_id, else a hash of the problem text, else meta id."""
    if meta.get("problem_id") is not None:
        return str(meta["problem_id"])
    for k in ("problem", "question"):
        text = meta.get(k)
        if isinstance(text, str) and text.strip():
            return "text:" + hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]
    return None if meta.get("id") is None else "id:" + str(meta["id"])


@dataclass
class _Unpacked:
    maps: np.ndarray  # [L, S, S]
    kinds: list[str]
    meta: dict


def result_meta(result: Any) -> dict:
    """The merged meta of a saliency result: the trace's (id, problem, correct, ...), then the result's own
    (model, pool, loss, layers win: they describe the maps). The trace's "model" (the model that wrote the
    trace) is kept as "source_model"."""
    meta: dict = {}
    trace = getattr(result, "trace", None)
    if trace is not None and isinstance(getattr(trace, "meta", None), dict):
        meta.update(trace.meta)
        if "model" in trace.meta:
            meta["source_model"] = trace.meta["model"]
    if isinstance(getattr(result, "meta", None), dict):
        meta.update({k: v for k, v in result.meta.items() if not (k == "id" and "id" in meta)})
    return meta


def _unpack(obj: Any, step_kinds: Sequence[str] | None = None) -> _Unpacked:
    if isinstance(obj, str | os.PathLike):
        from ..saliency.result import load_result  # torch: only when a folder is read

        obj = load_result(obj)
    if hasattr(obj, "maps"):
        trace = getattr(obj, "trace", None)
        if step_kinds is None:
            if trace is None:
                raise StepscopeError("the result has maps but no trace; pass step_kinds")
            step_kinds = [s.kind for s in trace.steps]
        maps, kinds = check_inputs(obj.maps, step_kinds)
        return _Unpacked(maps, list(kinds), result_meta(obj))
    if step_kinds is None:
        raise StepscopeError("diagnosing bare maps needs step_kinds (one kind per step)")
    maps, kinds = check_inputs(obj, step_kinds)
    return _Unpacked(maps, list(kinds), {})


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Diagnosis:
    """Per-layer metrics and scores of one trace, with z-scores, flags and a verdict against a baseline."""

    metrics: dict[str, list[float | None]]  # name -> [L]
    scores: dict[str, float | None]
    reasons: dict[str, str]  # metric or score name -> why (some of) its values are null
    num_layers: int  # maps in this diagnosis (= len(layers))
    step_counts: dict[str, int]
    rows: dict[str, int]
    meta: dict = field(default_factory=dict)
    layers: list[int] | None = None  # model layer of each map (None: all layers, 0 .. num_layers - 1)
    num_model_layers: int | None = None  # layers of the model (None: num_layers)
    z: dict[str, list[float | None]] | None = None
    flags: dict[str, list[bool | None]] | None = None
    score_z: dict[str, float | None] | None = None
    score_flags: dict[str, bool | None] | None = None
    verdict: dict | None = None
    baseline: dict | None = None  # where the baseline came from

    @property
    def layer_ids(self) -> list[int]:
        """The model layer of each map."""
        return list(range(self.num_layers)) if self.layers is None else list(self.layers)

    @property
    def model_layers(self) -> int:
        return self.num_layers if self.num_model_layers is None else self.num_model_layers

    @property
    def layer_groups(self) -> dict[str, list[int]]:
        """Positions (into the per-layer lists) of the shallow, deep and deep-half layers."""
        return layer_groups(self.model_layers, self.layer_ids)

    @property
    def id(self) -> str | None:
        v = self.meta.get("id")
        return None if v is None else str(v)

    def metric(self, name: str) -> np.ndarray:
        """float64 [L], NaN where null."""
        return np.array([np.nan if v is None else v for v in self.metrics[name]], dtype=np.float64)

    def to_json(self) -> dict:
        return {"stepscope_diagnosis": JSON_VERSION, "num_layers": self.num_layers, "layers": self.layer_ids,
                "num_model_layers": self.model_layers, "layer_groups": self.layer_groups,
                "step_counts": self.step_counts, "rows": self.rows,
                "meta": self.meta, "metrics": self.metrics, "scores": self.scores, "reasons": self.reasons,
                "z": self.z, "flags": self.flags, "score_z": self.score_z, "score_flags": self.score_flags,
                "verdict": self.verdict, "baseline": self.baseline}

    @classmethod
    def from_json(cls, d: dict) -> Diagnosis:
        if not isinstance(d, dict) or "stepscope_diagnosis" not in d:
            raise StepscopeError("not a stepscope diagnosis (no 'stepscope_diagnosis' key)")
        try:
            return cls(metrics=d["metrics"], scores=d["scores"], reasons=d.get("reasons", {}),
                       num_layers=int(d["num_layers"]), step_counts=d["step_counts"], rows=d.get("rows", {}),
                       meta=d.get("meta", {}), z=d.get("z"), flags=d.get("flags"), score_z=d.get("score_z"),
                       score_flags=d.get("score_flags"), verdict=d.get("verdict"), baseline=d.get("baseline"),
                       layers=d.get("layers"), num_model_layers=d.get("num_model_layers"))
        except (KeyError, TypeError, ValueError) as e:
            raise StepscopeError(f"malformed diagnosis JSON ({type(e).__name__}: {e})") from None

    def save(self, path: str | os.PathLike) -> None:
        from ..io import atomic_write_json

        atomic_write_json(path, self.to_json())

    def table(self) -> str:
        """A plain-text per-layer table (flagged values marked with '!'), the scores and the verdict."""
        return format_table(self)


def _layer_info(meta: dict, L: int) -> tuple[list[int], int]:
    """(model layer of each map, model depth) from a result's meta ("layers", "num_layers"); default all."""
    layers, depth = meta.get("layers"), meta.get("num_layers")
    if layers is None:
        return list(range(L)), int(depth) if isinstance(depth, int) and depth == L else L
    try:
        layers = [int(x) for x in layers]
        depth = int(depth) if depth is not None else max(layers) + 1
    except (TypeError, ValueError):
        raise StepscopeError("meta 'layers' must be a list of layer indices") from None
    if len(layers) != L:
        raise StepscopeError(f"meta lists {len(layers)} layers but the maps have {L}")
    if any(not 0 <= x < depth for x in layers) or sorted(set(layers)) != layers:
        raise StepscopeError(f"meta 'layers' must be increasing indices below num_layers={depth}")
    return layers, depth


def diagnose_maps(maps: Any, step_kinds: Sequence[str], meta: dict | None = None,
                  baseline: Profile | None = None) -> Diagnosis:
    """Diagnose bare maps [L, S, S] with their step kinds (the core of `diagnose`).

    meta "layers" / "num_layers" (as a saliency result writes them) say which model layer each map is, when
    only some layers were computed; layer groups and the slope then use model layer indices.
    """
    maps, kinds = check_inputs(maps, step_kinds)
    meta = dict(meta or {})
    layer_ids, depth = _layer_info(meta, maps.shape[0])
    values, reasons, rows = compute_metrics(maps, kinds)
    scores, score_reasons = compute_scores(values, depth, layer_ids)
    reasons.update(score_reasons)
    keep = {k: meta[k] for k in ("id", "model", "source_model", "correct", "pool", "loss", "problem_id", "arm", "sample")
            if k in meta}
    key = problem_key(meta)
    if key is not None:
        keep["problem_key"] = key
    if isinstance(meta.get("path"), str):
        keep["path"] = meta["path"]
    d = Diagnosis(metrics={k: [_none(v) for v in values[k]] for k in METRICS},
                  scores={k: _none(scores[k]) for k in SCORES}, reasons=reasons, num_layers=int(maps.shape[0]),
                  step_counts={k: int((kinds == k).sum()) for k in KINDS}, rows=rows, meta=keep,
                  layers=layer_ids, num_model_layers=depth)
    if baseline is not None:
        apply_baseline(d, baseline)
    return d


def diagnose(result_or_maps: Any, baseline: Profile | str | os.PathLike | None = None,
             step_kinds: Sequence[str] | None = None) -> Diagnosis:
    """Diagnose a saliency result (object with `.maps` and `.trace`, or its folder) or bare maps + step_kinds.

    With a baseline profile (a Profile or its JSON path), adds per-layer z-scores, flags and a verdict.
    """
    u = _unpack(result_or_maps, step_kinds)
    if isinstance(result_or_maps, str | os.PathLike):
        u.meta.setdefault("path", str(result_or_maps))
    if baseline is not None and not isinstance(baseline, Profile):
        baseline = Profile.load(baseline)
    return diagnose_maps(u.maps, u.kinds, u.meta, baseline)


def _fmt(v: float | None, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:.3g}".rjust(width)


def format_table(d: Diagnosis) -> str:
    """Per-layer table with short column names (legend below), flagged values marked '!'."""
    groups = d.layer_groups
    shallow, deep = set(groups["shallow"]), set(groups["deep"])
    cols = [SHORT_NAMES[n] for n in METRICS]
    widths = [max(9, len(c) + 1) for c in cols]
    head = f"{'layer':>5} {'band':<4}" + "".join(c.rjust(w) for c, w in zip(cols, widths))
    lines = [head]
    ids = d.layer_ids
    for layer in range(d.num_layers):
        band = "S" if layer in shallow else ("D" if layer in deep else "")
        cells = []
        for name, w in zip(METRICS, widths):
            s = _fmt(d.metrics[name][layer], w - 1)
            flag = d.flags is not None and d.flags[name][layer]
            cells.append(s + ("!" if flag else " "))
        lines.append(f"{ids[layer]:>5} {band:<4}" + "".join(cells))
    lines.append("legend: " + ", ".join(f"{SHORT_NAMES[n]}={n}" for n in METRICS)
                 + "; band S=shallow quarter, D=deep quarter; '-' = null" + ("; '!' = flagged" if d.flags else ""))
    lines.append(format_scores(d))
    for name, why in sorted(d.reasons.items()):
        if name not in SCORES:  # a null score's reason is on the scores line
            lines.append(f"null {name}: {why}")
    return "\n".join(lines)


def format_scores(d: Diagnosis) -> str:
    """The scores on one line (a null one with its reason), their z-scores and flags, and the verdict."""
    parts = []
    for name in SCORES:
        v = d.scores[name]
        s = f"{name}={'null' if v is None else format(v, '.4g')}"
        if v is None and d.reasons.get(name):
            s += f" ({d.reasons[name]})"
        if d.score_z is not None and d.score_z.get(name) is not None:
            s += f" (z={d.score_z[name]:+.2f}{', flagged' if d.score_flags.get(name) else ''})"
        parts.append(s)
    verdict = d.verdict["summary"] if d.verdict else "no verdict (no baseline profile)"
    return "; ".join(parts) + f"; verdict: {verdict}"
