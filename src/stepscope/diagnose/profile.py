"""Baseline profiles (per-layer mean and spread of the metrics over normal traces) and the verdict of one trace
against a profile: z-scores, flags and a per-pattern status.

Decisions (ours): a value is flagged when |z| > 2 (`Z_THRESHOLD`) in the metric's bad direction. Shallow lock-in
is flagged when lock_in_score is flagged; deep decay when decay_slope or deep_summary_to_thinking is flagged.
Per-layer flags are listed as evidence, not votes (with a dozen metric-layer cells per band, some cell passes
|z| > 2 by chance in many normal traces).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import StepscopeError
from .metrics import (
    BAD_DIRECTION,
    DECAY_METRICS,
    JSON_VERSION,
    LOCK_IN_METRICS,
    METRICS,
    SCORES,
    format_ranges,
)

if TYPE_CHECKING:
    from .diagnosis import Diagnosis

Z_THRESHOLD = 2.0


@dataclass
class Profile:
    """Per-layer mean and sample standard deviation of every metric (and score) over a set of traces."""

    num_layers: int
    metrics: dict[str, dict[str, list]]  # name -> {"mean": [L], "std": [L], "n": [L]}
    scores: dict[str, dict[str, Any]]  # name -> {"mean", "std", "n"}
    sources: list[str | None]
    model: str | None = None
    layers: list[int] | None = None  # model layer of each entry (None: all)

    @property
    def layer_ids(self) -> list[int]:
        return list(range(self.num_layers)) if self.layers is None else list(self.layers)

    def to_json(self) -> dict:
        return {"stepscope_profile": JSON_VERSION, "num_layers": self.num_layers, "layers": self.layer_ids,
                "model": self.model,
                "n_traces": len(self.sources), "sources": self.sources, "metrics": self.metrics,
                "scores": self.scores}

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        if not isinstance(d, dict) or "stepscope_profile" not in d:
            raise StepscopeError("not a stepscope baseline profile (no 'stepscope_profile' key)")
        try:
            p = cls(int(d["num_layers"]), d["metrics"], d["scores"], list(d.get("sources", [])), d.get("model"),
                    d.get("layers"))
            for name in METRICS:
                for k in ("mean", "std", "n"):
                    if len(p.metrics[name][k]) != p.num_layers:
                        raise ValueError(f"{name}.{k} has {len(p.metrics[name][k])} layers")
            for name in SCORES:
                p.scores[name]["mean"], p.scores[name]["std"]  # noqa: B018  (presence check)
        except (KeyError, TypeError, ValueError) as e:
            raise StepscopeError(f"malformed baseline profile ({type(e).__name__}: {e})") from None
        return p

    def save(self, path: str | os.PathLike) -> None:
        from ..io import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        from ..io import read_text_file

        try:
            d = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path}: not valid JSON ({e.msg})") from None
        try:
            return cls.from_json(d)
        except StepscopeError as e:
            raise StepscopeError(f"{path}: {e}") from None


def _mean_std(values: list[float]) -> tuple[float | None, float | None, int]:
    x = np.array(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return None, None, 0
    return float(x.mean()), (float(x.std(ddof=1)) if n >= 2 else None), n


def build_profile(diagnoses: Sequence[Diagnosis]) -> Profile:
    """A baseline profile (per-layer mean/std, n) from diagnoses, e.g. of one model's correct traces."""
    diagnoses = list(diagnoses)
    if not diagnoses:
        raise StepscopeError("a baseline profile needs at least one diagnosis")
    L, ids = diagnoses[0].num_layers, diagnoses[0].layer_ids
    for d in diagnoses:
        if d.layer_ids != ids:
            raise StepscopeError(f"cannot pool traces of different layers into one profile ({format_ranges(ids)} and "
                                 f"{format_ranges(d.layer_ids)})")
    metrics: dict[str, dict[str, list]] = {}
    for name in METRICS:
        cols = [_mean_std([d.metrics[name][layer] for d in diagnoses if d.metrics[name][layer] is not None])
                for layer in range(L)]
        metrics[name] = {"mean": [c[0] for c in cols], "std": [c[1] for c in cols], "n": [c[2] for c in cols]}
    scores = {}
    for name in SCORES:
        mu, sd, n = _mean_std([d.scores[name] for d in diagnoses if d.scores[name] is not None])
        scores[name] = {"mean": mu, "std": sd, "n": n}
    models = {d.meta.get("model") for d in diagnoses}
    return Profile(L, metrics, scores, [d.id for d in diagnoses], models.pop() if len(models) == 1 else None, ids)


def _z(x: float | None, mu: float | None, sd: float | None) -> float | None:
    if x is None or mu is None or sd is None or not sd > 0:
        return None
    return float((x - mu) / sd)


def _flag(name: str, z: float | None, threshold: float) -> bool | None:
    if z is None:
        return None
    d = BAD_DIRECTION[name]
    return bool(d != 0 and d * z > threshold)


def apply_baseline(d: Diagnosis, profile: Profile, threshold: float = Z_THRESHOLD) -> Diagnosis:
    """Add z-scores, flags (|z| > threshold in the bad direction) and a verdict to `d` (in place; returns d)."""
    if profile.layer_ids != d.layer_ids:
        raise StepscopeError(f"the baseline profile covers layers {format_ranges(profile.layer_ids)}, this result "
                             f"{format_ranges(d.layer_ids)}: use a profile of the same model and layers")
    d.z, d.flags = {}, {}
    for name in METRICS:
        p = profile.metrics[name]
        d.z[name] = [_z(d.metrics[name][layer], p["mean"][layer], p["std"][layer]) for layer in range(d.num_layers)]
        d.flags[name] = [_flag(name, z, threshold) for z in d.z[name]]
    d.score_z = {name: _z(d.scores[name], profile.scores[name]["mean"], profile.scores[name]["std"])
                 for name in SCORES}
    d.score_flags = {name: _flag(name, d.score_z[name], threshold) for name in SCORES}
    d.baseline = {"n_traces": len(profile.sources), "model": profile.model, "z_threshold": threshold}
    d.verdict = _verdict(d, threshold)
    return d


def _verdict(d: Diagnosis, threshold: float) -> dict:
    """Per pattern: flagged when one of its scores is flagged; 'not assessable' when none has a z-score.
    Layers of the pattern's band with a flagged metric are listed as evidence."""
    groups = d.layer_groups
    out: dict[str, Any] = {}
    for pattern, scores, band, names in (
            ("shallow_lock_in", ("lock_in_score",), groups["shallow"], LOCK_IN_METRICS),
            ("deep_decay", ("decay_slope", "deep_summary_to_thinking"), groups["deep"], DECAY_METRICS)):
        zs = {s: d.score_z[s] for s in scores if d.score_z[s] is not None}
        flagged_layers = [d.layer_ids[k] for k in band if any(d.flags[n][k] for n in names)]
        band_ids = [d.layer_ids[k] for k in band]
        if not zs:
            why = next((d.reasons[s] for s in scores if s in d.reasons), None) \
                or "the baseline has no spread for its scores"
            out[pattern] = {"status": "not assessable", "reason": why, "flagged_layers": flagged_layers}
            continue
        parts = [f"{s} z={z:+.2f}" for s, z in zs.items()]
        parts.append(f"{len(flagged_layers)} of {len(band)} layers in band {format_ranges(band_ids) or 'none'} have a "
                     "flagged metric")
        hit = any(d.score_flags[s] for s in zs)
        out[pattern] = {"status": "flagged" if hit else "not flagged", "reason": "; ".join(parts),
                        "flagged_layers": flagged_layers}
    statuses = {k: v["status"] for k, v in out.items()}
    names = {"shallow_lock_in": "shallow lock-in", "deep_decay": "deep decay"}
    hits = [names[k] for k, s in statuses.items() if s == "flagged"]
    if hits:
        summary = " and ".join(hits) + f" beyond the baseline (|z| > {threshold:g})"
    elif all(s == "not assessable" for s in statuses.values()):
        summary = "not assessable against this baseline"
    else:
        summary = "within the baseline"
        missing = [names[k] for k, s in statuses.items() if s == "not assessable"]
        if missing:
            summary += f" ({' and '.join(missing)} not assessable)"
    out["summary"] = summary
    return out

