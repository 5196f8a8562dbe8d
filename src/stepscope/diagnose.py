"""Shallow Lock-in and Deep Decay metrics (METHOD.md §4) per layer, baseline profiles, and group comparison.

Input: step maps `M` [L, S, S] (pooled saliency, row i = query step, column j = key step) and the kind of every
step ("question", "thinking" or "summary", in that order). `N[l][i, :] = M[l][i, :] / sum_j M[l][i, j]`.

Decisions (ours, where METHOD.md is silent):
- `question_reach` sums N over every question step (the question is one step unless it was split).
- `thinking_recency` is the per-row share (last 3 thinking steps / all thinking) averaged over summary rows;
  it needs at least 4 thinking steps (with 3 or fewer the share is 1 by construction, not a measurement).
- Rows whose saliency sums to 0 have no N and are left out of the means (counted in `rows`).
- Block intensities average M over the whole block, causally masked (zero) cells included.
- `decay_slope` is the least-squares slope per layer index over the deep half, layers [L - L//2, L)
  (at least 2 layers); `lock_in_score` averages `locality` over the shallow quarter [0, max(1, L//4)).
  A third score, `deep_summary_to_thinking`, averages `summary_to_thinking` over the deep quarter: a summary
  that reads little thinking in every deep layer has decayed even when the slope is flat.
- Verdicts (only against a baseline): shallow lock-in is flagged when lock_in_score is flagged; deep decay when
  decay_slope or deep_summary_to_thinking is flagged. Per-layer flags are listed as evidence, not votes (with
  a dozen metric-layer cells per band, some cell passes |z| > 2 by chance in many normal traces).
- Bad directions (for flags): high locality / summary_self / thinking_recency / final_block_intensity /
  final_heat_anomaly / lock_in_score, low question_reach / far_reach / summary_to_thinking / decay_slope.
  analysis_block_intensity gets a z-score but no flag (the paper gives it no direction).
- Pairing key of a trace (for comparisons): meta "problem_id" if set, else a hash of the whitespace-normalized
  problem text (meta "problem", else "question"), else meta "id". Ids alone rarely pair: they usually name the
  model too (e.g. "gsm8k-209-qwq-32b").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StepscopeError

KINDS = ("question", "thinking", "summary")
LOCK_IN_METRICS = ("locality", "question_reach", "far_reach")
DECAY_METRICS = ("summary_to_thinking", "summary_self", "thinking_recency")
BLOCK_METRICS = ("analysis_block_intensity", "final_block_intensity", "final_heat_anomaly")
METRICS = LOCK_IN_METRICS + DECAY_METRICS + BLOCK_METRICS
SCORES = ("lock_in_score", "decay_slope", "deep_summary_to_thinking")
# +1: high is bad, -1: low is bad, 0: no flag
BAD_DIRECTION = {"locality": 1, "question_reach": -1, "far_reach": -1, "summary_to_thinking": -1,
                 "summary_self": 1, "thinking_recency": 1, "analysis_block_intensity": 0,
                 "final_block_intensity": 1, "final_heat_anomaly": 1, "lock_in_score": 1, "decay_slope": -1,
                 "deep_summary_to_thinking": -1}
SHORT_NAMES = {"locality": "loc", "question_reach": "q_reach", "far_reach": "far", "summary_to_thinking": "sum>th",
               "summary_self": "sum_self", "thinking_recency": "recency", "analysis_block_intensity": "analysis",
               "final_block_intensity": "final", "final_heat_anomaly": "anomaly"}
Z_THRESHOLD = 2.0
JSON_VERSION = 1


# -- inputs -------------------------------------------------------------------------------------------------------

def layer_groups(num_layers: int, layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Shallow quarter, deep quarter (METHOD.md §3, at least one layer each) and deep half (>= 2 layers).

    Model layers [0, L//4), [L - L//4, L) and [L - L//2, L) of a model with `num_layers` layers. Returned as
    positions in `layers` (the model layer of each map; default all layers, so positions = layer indices); a
    group keeps only the computed layers that fall in it, maybe none.
    """
    L = int(num_layers)
    q = max(1, L // 4)
    h = min(L, max(2, L // 2))
    bounds = {"shallow": (0, min(q, L)), "deep": (max(0, L - q), L), "deep_half": (L - h, L)}
    ids = list(range(L)) if layers is None else [int(x) for x in layers]
    return {name: [k for k, x in enumerate(ids) if a <= x < b] for name, (a, b) in bounds.items()}


def problem_key(meta: dict) -> str | None:
    """The pairing key of a trace: meta problem_id, else a hash of the problem text, else meta id."""
    if meta.get("problem_id") is not None:
        return str(meta["problem_id"])
    for k in ("problem", "question"):
        text = meta.get(k)
        if isinstance(text, str) and text.strip():
            return "text:" + hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]
    return None if meta.get("id") is None else "id:" + str(meta["id"])


def _as_numpy(maps: Any) -> np.ndarray:
    if hasattr(maps, "detach"):  # torch.Tensor, without importing torch here
        maps = maps.detach().float().cpu().numpy()
    return np.asarray(maps)


def check_inputs(maps: Any, step_kinds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate maps [L, S, S] and step kinds (question*, thinking*, summary*); returns (maps, kinds array)."""
    m = _as_numpy(maps)
    if m.ndim != 3 or m.shape[1] != m.shape[2]:
        raise StepscopeError(f"step maps must have shape [layers, steps, steps], got {tuple(m.shape)}")
    kinds = np.asarray(list(step_kinds), dtype=object)
    if m.shape[1] != kinds.size:
        raise StepscopeError(f"step maps have {m.shape[1]} steps but {kinds.size} step kinds were given")
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise StepscopeError(f"step maps are empty (shape {tuple(m.shape)})")
    bad = sorted({str(k) for k in kinds} - set(KINDS))
    if bad:
        raise StepscopeError(f"unknown step kind(s) {', '.join(bad)}; expected {', '.join(KINDS)}")
    order = np.array([KINDS.index(k) for k in kinds])
    if np.any(np.diff(order) < 0):
        raise StepscopeError("steps must come in the order question, thinking, summary")
    if not np.all(np.isfinite(m)):
        raise StepscopeError("step maps contain NaN or inf")
    if np.any(m < 0):
        raise StepscopeError("step maps contain negative values (saliency is an absolute value)")
    return m, kinds


@dataclass
class _Unpacked:
    maps: np.ndarray  # [L, S, S]
    kinds: list[str]
    meta: dict
    texts: list[str] | None


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
        obj = load_result(obj)
    if hasattr(obj, "maps"):
        trace = getattr(obj, "trace", None)
        if step_kinds is None:
            if trace is None:
                raise StepscopeError("the result has maps but no trace; pass step_kinds")
            step_kinds = [s.kind for s in trace.steps]
        texts = [s.text for s in trace.steps] if trace is not None else None
        maps, kinds = check_inputs(obj.maps, step_kinds)
        return _Unpacked(maps, list(kinds), result_meta(obj), texts)
    if step_kinds is None:
        raise StepscopeError("diagnosing bare maps needs step_kinds (one kind per step)")
    maps, kinds = check_inputs(obj, step_kinds)
    return _Unpacked(maps, list(kinds), {}, None)


@dataclass
class FolderResult:
    """A saliency result read from its folder (maps.safetensors, trace.json, meta.json)."""

    maps: np.ndarray  # float32 [L, S, S]
    trace: Any
    meta: dict
    path: Path | None = None


def load_result(path: str | os.PathLike) -> Any:
    """Read a saliency result folder; stepscope.saliency's SaliencyResult when present, else a FolderResult."""
    path = Path(path)
    if not path.is_dir():
        raise StepscopeError(f"{path}: no such folder (expected a saliency result folder)")
    if not (path / "maps.safetensors").is_file():
        raise StepscopeError(f"{path}: not a saliency result folder (no maps.safetensors)")
    try:
        from .saliency import SaliencyResult  # the saliency engineer's loader, when it exists
    except ImportError:
        SaliencyResult = None  # noqa: N806
    if SaliencyResult is not None and hasattr(SaliencyResult, "load"):
        res = SaliencyResult.load(path)
        if getattr(res, "path", None) is None:
            try:
                res.path = path
            except AttributeError:
                pass
        return res
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .io import read_text_file
    from .trace import Trace

    try:
        tensors = load_file(str(path / "maps.safetensors"))
    except (SafetensorError, OSError) as e:
        raise StepscopeError(f"{path / 'maps.safetensors'}: cannot be read ({e})") from None
    if "maps" not in tensors:
        raise StepscopeError(f"{path / 'maps.safetensors'}: has no tensor named 'maps'")
    trace = Trace.load(path / "trace.json")
    meta = {}
    if (path / "meta.json").is_file():
        try:
            meta = json.loads(read_text_file(path / "meta.json"))
        except json.JSONDecodeError as e:
            raise StepscopeError(f"{path / 'meta.json'}: not valid JSON ({e.msg})") from None
    return FolderResult(tensors["maps"], trace, meta if isinstance(meta, dict) else {}, path)


def find_results(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Result folders named by `paths`: each path is a result folder (holding maps.safetensors) or a folder of
    them (as `stepscope saliency --out DIR` writes: DIR/<trace id>/), expanded in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "maps.safetensors").is_file():
            out.append(p)
        elif p.is_dir():
            subs = sorted(q for q in p.iterdir() if (q / "maps.safetensors").is_file())
            if not subs:
                raise StepscopeError(f"{p}: not a saliency result folder, nor a folder of them "
                                     "(no maps.safetensors)")
            out.extend(subs)
        else:
            raise StepscopeError(f"{p}: no such folder")
    return out


# -- the metrics --------------------------------------------------------------------------------------------------

def _nanmean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan


def compute_metrics(maps: Any, step_kinds: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str],
                                                                     dict[str, int]]:
    """Every METHOD.md §4 metric per layer: ({name: float64 [L] with NaN where null}, {name: reason}, row counts).

    Vectorized per layer; memory O(S^2) beyond the input.
    """
    maps, kinds = check_inputs(maps, step_kinds)
    L, S, _ = maps.shape
    is_q, is_t, is_s = (kinds == "question"), (kinds == "thinking"), (kinds == "summary")
    t_pos = np.flatnonzero(is_t)
    s_pos = np.flatnonzero(is_s)
    n_t, n_s = t_pos.size, s_pos.size
    t0, t1 = (int(t_pos[0]), int(t_pos[-1]) + 1) if n_t else (0, 0)
    s0, s1 = (int(s_pos[0]), int(s_pos[-1]) + 1) if n_s else (0, 0)
    lock_rows = t_pos[3:]  # thinking steps with >= 3 earlier thinking steps
    out = {name: np.full(L, np.nan) for name in METRICS}
    reasons: dict[str, str] = {}
    zero_rows: dict[str, list[int]] = {}

    if lock_rows.size == 0:
        for name in LOCK_IN_METRICS:
            reasons[name] = (f"needs a thinking step with 3 earlier thinking steps; the trace has {n_t} thinking "
                             f"step{'s' if n_t != 1 else ''}")
    if n_s == 0:
        for name in DECAY_METRICS:
            reasons[name] = "the trace has no summary steps (the thinking never closed?)"
    elif n_t == 0:
        for name in DECAY_METRICS:
            reasons[name] = "the trace has no thinking steps"
    elif n_t < 4:
        reasons["thinking_recency"] = (f"needs at least 4 thinking steps (with {n_t}, the last 3 thinking steps "
                                       "are all of the thinking)")
    if n_t == 0:
        reasons["analysis_block_intensity"] = "the trace has no thinking steps"
        reasons["final_heat_anomaly"] = "the trace has no thinking steps"
    if n_s == 0:
        reasons["final_block_intensity"] = "the trace has no summary steps"
        reasons.setdefault("final_heat_anomaly", "the trace has no summary steps")

    rows = {"lock_in_rows": int(lock_rows.size), "summary_rows": int(n_s)}
    for layer in range(L):
        m = maps[layer].astype(np.float64)  # [S, S]
        row_sum = m.sum(axis=1)  # [S]
        if lock_rows.size:
            r = lock_rows[row_sum[lock_rows] > 0]  # [R]
            if r.size:
                n = m[r] / row_sum[r, None]  # [R, S] = N rows
                out["locality"][layer] = _nanmean(n[np.arange(r.size), r] + n[np.arange(r.size), r - 1])
                out["question_reach"][layer] = _nanmean(n[:, is_q].sum(axis=1))
                # far: thinking columns t0 .. i-2; prefix sums over the thinking block, read at (i - 2) - t0
                prefix = np.cumsum(n[:, t0:t1], axis=1)  # [R, n_t]
                out["far_reach"][layer] = _nanmean(prefix[np.arange(r.size), r - 2 - t0])
            else:
                zero_rows.setdefault("lock_in", []).append(layer)
        if n_s and n_t:
            ok = row_sum[s_pos] > 0
            r = s_pos[ok]
            if r.size:
                n = m[r] / row_sum[r, None]  # [R, S]
                think = n[:, t0:t1].sum(axis=1)  # [R]
                out["summary_to_thinking"][layer] = _nanmean(think)
                out["summary_self"][layer] = _nanmean(n[:, s0:s1].sum(axis=1))
                if n_t >= 4:
                    has = think > 0
                    if has.any():
                        last3 = n[has, t1 - 3:t1].sum(axis=1)
                        out["thinking_recency"][layer] = _nanmean(last3 / think[has])
                    else:
                        zero_rows.setdefault("recency", []).append(layer)
            else:
                zero_rows.setdefault("summary", []).append(layer)
        if n_t:
            out["analysis_block_intensity"][layer] = m[t0:t1, t0:t1].mean()
        if n_s:
            out["final_block_intensity"][layer] = m[s0:s1, s0:s1].mean()
        if n_t and n_s:
            a = out["analysis_block_intensity"][layer]
            if a > 0:
                out["final_heat_anomaly"][layer] = out["final_block_intensity"][layer] / a
            else:
                zero_rows.setdefault("anomaly", []).append(layer)

    def note(names: Iterable[str], layers: list[int], what: str) -> None:
        for name in names:
            if name not in reasons:
                reasons[name] = f"{what} at layer{'s' if len(layers) > 1 else ''} {_ranges(layers)}"
    if "lock_in" in zero_rows:
        note(LOCK_IN_METRICS, zero_rows["lock_in"], "every eligible thinking row has zero saliency")
    if "summary" in zero_rows:
        note(DECAY_METRICS, zero_rows["summary"], "every summary row has zero saliency")
    if "recency" in zero_rows:
        note(["thinking_recency"], zero_rows["recency"], "no summary row puts saliency on the thinking")
    if "anomaly" in zero_rows:
        note(["final_heat_anomaly"], zero_rows["anomaly"], "the thinking block has zero saliency")
    return out, reasons, rows


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


def compute_scores(metrics: dict[str, np.ndarray], num_layers: int, layers: Sequence[int] | None = None
                   ) -> tuple[dict[str, float], dict[str, str]]:
    """lock_in_score (mean locality over shallow layers), decay_slope (LSQ slope of summary_to_thinking over
    the deep half) and deep_summary_to_thinking (its mean over the deep quarter)."""
    groups = layer_groups(num_layers, layers)
    ids = np.arange(num_layers) if layers is None else np.asarray(layers)
    scores: dict[str, float] = {}
    reasons: dict[str, str] = {}
    loc = metrics["locality"][groups["shallow"]]
    loc = loc[np.isfinite(loc)]
    if loc.size:
        scores["lock_in_score"] = float(loc.mean())
    else:
        scores["lock_in_score"] = math.nan
        reasons["lock_in_score"] = ("locality is null in every shallow layer" if groups["shallow"] else
                                    "no shallow layer was computed")
    x_all = ids[groups["deep_half"]].astype(np.float64)  # model layer index, the slope's unit
    y = metrics["summary_to_thinking"][groups["deep_half"]]
    ok = np.isfinite(y)
    if num_layers < 2:
        scores["decay_slope"] = math.nan
        reasons["decay_slope"] = "needs at least 2 layers"
    elif ok.sum() < 2:
        scores["decay_slope"] = math.nan
        reasons["decay_slope"] = ("summary_to_thinking is null in the deep half of the layers" if len(x_all) >= 2
                                  else "fewer than 2 layers of the deep half were computed")
    else:
        x, y = x_all[ok], y[ok]
        xc = x - x.mean()
        scores["decay_slope"] = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    deep = metrics["summary_to_thinking"][groups["deep"]]
    deep = deep[np.isfinite(deep)]
    if deep.size:
        scores["deep_summary_to_thinking"] = float(deep.mean())
    else:
        scores["deep_summary_to_thinking"] = math.nan
        reasons["deep_summary_to_thinking"] = ("summary_to_thinking is null in every deep layer" if groups["deep"]
                                               else "no deep layer was computed")
    return scores, reasons


def _none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# -- Diagnosis ------------------------------------------------------------------------------------------------

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
                "num_model_layers": self.model_layers, "layer_groups": self.layer_groups, "step_counts": self.step_counts, "rows": self.rows,
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
        from .io import atomic_write_json

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
    keep = {k: meta[k] for k in ("id", "model", "source_model", "correct", "pool", "loss", "problem_id")
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


# -- baseline profiles ----------------------------------------------------------------------------------------

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
        from .io import atomic_write_json

        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        from .io import read_text_file

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
            raise StepscopeError(f"cannot pool traces of different layers into one profile ({_ranges(ids)} and "
                                 f"{_ranges(d.layer_ids)})")
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
        raise StepscopeError(f"the baseline profile covers layers {_ranges(profile.layer_ids)}, this result "
                             f"{_ranges(d.layer_ids)}: use a profile of the same model and layers")
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
        parts.append(f"{len(flagged_layers)} of {len(band)} layers in band {_ranges(band_ids) or 'none'} have a "
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


# -- text output ----------------------------------------------------------------------------------------------

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
        lines.append(f"null {name}: {why}")
    return "\n".join(lines)


def format_scores(d: Diagnosis) -> str:
    parts = []
    for name in SCORES:
        v = d.scores[name]
        s = f"{name}={'null' if v is None else format(v, '.4g')}"
        if d.score_z is not None and d.score_z.get(name) is not None:
            s += f" (z={d.score_z[name]:+.2f}{', flagged' if d.score_flags.get(name) else ''})"
        parts.append(s)
    verdict = d.verdict["summary"] if d.verdict else "no verdict (no baseline profile)"
    return "; ".join(parts) + f"; verdict: {verdict}"


# -- group comparison -------------------------------------------------------------------------------------------

MULTIPLE_COMPARISONS_NOTE = (
    "Each metric is tested at every layer, so p-values are also given adjusted across the layers of that "
    "metric: p_holm (Holm, family-wise error) and q_bh (Benjamini-Hochberg, false discovery rate). The nine "
    "metrics overlap (they are built from the same maps), so no adjustment across metrics is made; read a "
    "single unadjusted p < 0.05 among hundreds of tests as noise.")


@dataclass
class Comparison:
    """Correct-versus-wrong statistics per metric and layer (differences are wrong - correct)."""

    num_layers: int
    groups: dict[str, dict]
    pairing: dict
    metrics: dict[str, list[dict]]  # name -> [L] of per-layer statistics
    scores: dict[str, dict]
    settings: dict
    layers: list[int] | None = None  # model layer of each entry (None: all)
    num_model_layers: int | None = None

    @property
    def layer_ids(self) -> list[int]:
        return list(range(self.num_layers)) if self.layers is None else list(self.layers)

    @property
    def layer_groups(self) -> dict[str, list[int]]:
        return layer_groups(self.num_model_layers or self.num_layers, self.layer_ids)

    def to_json(self) -> dict:
        return {"stepscope_comparison": JSON_VERSION, "direction": "wrong - correct", "num_layers": self.num_layers,
                "layers": self.layer_ids, "num_model_layers": self.num_model_layers or self.num_layers,
                "layer_groups": self.layer_groups, "groups": self.groups, "pairing": self.pairing,
                "settings": self.settings, "multiple_comparisons": MULTIPLE_COMPARISONS_NOTE,
                "metrics": self.metrics, "scores": self.scores}

    def curve(self, name: str, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, low, high) float64 [L] of a metric in a group ("correct" or "wrong"); NaN where null."""
        def get(row: dict, k: str) -> float:
            g = row[group]
            return np.nan if g is None or g[k] is None else g[k]
        rows = self.metrics[name]
        return tuple(np.array([get(r, k) for r in rows], dtype=np.float64) for k in ("estimate", "low", "high"))

    def table(self, alpha: float = 0.05) -> str:
        """Text summary: scores, then per metric the layers where Welch's Holm-adjusted p < alpha."""
        lines = [f"correct: {self.groups['correct']['n']} traces, wrong: {self.groups['wrong']['n']} traces, "
                 f"{self.pairing['shared_problems']} shared problems (paired tests on those)"]
        for name in SCORES:
            s = self.scores[name]
            lines.append(f"{name}: " + _describe(s))
        lines.append(f"{'metric':<25} layers with Welch p_holm < {alpha:g} (difference wrong - correct, hedges g)")
        for name in METRICS:
            hits = []
            for layer, row in enumerate(self.metrics[name]):
                w = row["welch"]
                if w and w.get("p_holm") is not None and w["p_holm"] < alpha:
                    diff = row["difference"]["estimate"]
                    g = w["effect_size"]
                    hits.append(f"{self.layer_ids[layer]} ({diff:+.3g}, g={'-' if g is None else format(g, '+.2f')})")
            lines.append(f"{name:<25} " + (", ".join(hits) if hits else "none"))
        return "\n".join(lines)


def _describe(s: dict) -> str:
    def ci(x: dict | None) -> str:
        if x is None:
            return "null"
        if x["low"] is None:
            return f"{x['estimate']:.4g}"
        return f"{x['estimate']:.4g} [{x['low']:.4g}, {x['high']:.4g}]"
    w, mw = s["welch"], s["mann_whitney"]
    out = f"correct {ci(s['correct'])}, wrong {ci(s['wrong'])}"
    if w and w["p_value"] is not None:
        out += f"; Welch p={w['p_value']:.3g} (g={w['effect_size']:+.2f})"
    if mw and mw["p_value"] is not None:
        out += f"; Mann-Whitney p={mw['p_value']:.3g} (r={mw['effect_size']:+.2f})"
    if s.get("paired"):
        out += f"; paired ({s['paired']['n_pairs']} problems) p={s['paired']['permutation']['p_value']:.3g}"
    return out


def _group_stats(c: list[float], w: list[float], pairs: list[tuple[float, float]], n_boot: int, n_perm: int,
                 level: float, seed: int) -> dict:
    from .stats import (
        bootstrap_ci,
        bootstrap_diff_ci,
        mann_whitney_test,
        paired_bootstrap_ci,
        paired_permutation_test,
        welch_test,
    )

    out: dict[str, Any] = {"n_correct": len(c), "n_wrong": len(w)}
    out["correct"] = bootstrap_ci(c, n_boot=n_boot, level=level, seed=seed).to_json() if c else None
    out["wrong"] = bootstrap_ci(w, n_boot=n_boot, level=level, seed=seed + 1).to_json() if w else None
    out["difference"] = (bootstrap_diff_ci(w, c, n_boot=n_boot, level=level, seed=seed + 2).to_json()
                         if c and w else None)
    out["welch"] = welch_test(w, c).to_json() if c and w else None
    out["mann_whitney"] = mann_whitney_test(w, c).to_json() if c and w else None
    if pairs:
        pw, pc = [p[1] for p in pairs], [p[0] for p in pairs]
        out["paired"] = {"n_pairs": len(pairs),
                         "difference": paired_bootstrap_ci(pw, pc, n_boot=n_boot, level=level,
                                                                 seed=seed + 3).to_json(),
                         "permutation": paired_permutation_test(pw, pc, n_perm=n_perm,
                                                                      seed=seed + 4).to_json()}
    else:
        out["paired"] = None
    return out


def _paired_values(correct: list[tuple[str | None, float | None]],
                   wrong: list[tuple[str | None, float | None]]) -> list[tuple[float, float]]:
    """(mean correct, mean wrong) per problem present in both groups (several traces per problem averaged)."""
    def by_key(items: list[tuple[str | None, float | None]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for key, v in items:
            if key is not None and v is not None:
                out.setdefault(key, []).append(v)
        return out
    c, w = by_key(correct), by_key(wrong)
    return [(float(np.mean(c[k])), float(np.mean(w[k]))) for k in sorted(set(c) & set(w))]


def compare(correct: Sequence[Any], wrong: Sequence[Any], *, n_boot: int = 10_000, n_perm: int = 10_000,
            level: float = 0.95, seed: int = 0) -> Comparison:
    """Compare two groups of traces (Diagnosis objects, results or result folders) metric by metric, layer by
    layer: bootstrap means with intervals, Welch and Mann-Whitney with effect sizes, paired tests over shared
    problems, Holm and Benjamini-Hochberg adjustment across layers. Differences are wrong - correct."""
    from .stats import benjamini_hochberg, holm

    dc = [x if isinstance(x, Diagnosis) else diagnose(x) for x in correct]
    dw = [x if isinstance(x, Diagnosis) else diagnose(x) for x in wrong]
    if not dc or not dw:
        raise StepscopeError(f"compare needs at least one trace per group (correct: {len(dc)}, wrong: {len(dw)})")
    L, ids = dc[0].num_layers, dc[0].layer_ids
    for d in dc + dw:
        if d.layer_ids != ids or d.model_layers != dc[0].model_layers:
            raise StepscopeError(f"cannot compare results of different layers ({_ranges(ids)} and "
                                 f"{_ranges(d.layer_ids)}, {d.id or 'a trace'}): use one model and one layer set")
    kc = [d.meta.get("problem_key") for d in dc]
    kw = [d.meta.get("problem_key") for d in dw]
    shared = sorted({k for k in kc if k} & {k for k in kw if k})
    metrics: dict[str, list[dict]] = {}
    for mi, name in enumerate(METRICS):
        rows = []
        for layer in range(L):
            c = [d.metrics[name][layer] for d in dc if d.metrics[name][layer] is not None]
            w = [d.metrics[name][layer] for d in dw if d.metrics[name][layer] is not None]
            pairs = _paired_values([(k, d.metrics[name][layer]) for k, d in zip(kc, dc)],
                                   [(k, d.metrics[name][layer]) for k, d in zip(kw, dw)])
            rows.append({"layer": ids[layer], **_group_stats(c, w, pairs, n_boot, n_perm, level,
                                                         seed + 1000 * mi + 10 * layer)})
        for test in ("welch", "mann_whitney"):
            ps = [r[test]["p_value"] if r[test] else None for r in rows]
            for r, ph, qb in zip(rows, holm(ps), benjamini_hochberg(ps)):
                if r[test]:
                    r[test]["p_holm"], r[test]["q_bh"] = ph, qb
        ps = [r["paired"]["permutation"]["p_value"] if r["paired"] else None for r in rows]
        for r, ph, qb in zip(rows, holm(ps), benjamini_hochberg(ps)):
            if r["paired"]:
                r["paired"]["permutation"]["p_holm"], r["paired"]["permutation"]["q_bh"] = ph, qb
        metrics[name] = rows
    scores = {}
    for si, name in enumerate(SCORES):
        c = [d.scores[name] for d in dc if d.scores[name] is not None]
        w = [d.scores[name] for d in dw if d.scores[name] is not None]
        pairs = _paired_values([(k, d.scores[name]) for k, d in zip(kc, dc)],
                               [(k, d.scores[name]) for k, d in zip(kw, dw)])
        scores[name] = _group_stats(c, w, pairs, n_boot, n_perm, level, seed + 100_000 + si)
        scores[name]["values"] = {"correct": [d.scores[name] for d in dc], "wrong": [d.scores[name] for d in dw]}
    pairing = {"key": "meta problem_id, else a hash of the whitespace-normalized problem text, else meta id",
               "shared_problems": len(shared),
               "note": ("paired tests use the problems present in both groups (several traces of one problem in "
                        "a group are averaged first); unpaired tests use every trace") if shared else
                       "no problem appears in both groups: only unpaired tests"}
    groups = {"correct": {"n": len(dc), "ids": [d.id for d in dc]}, "wrong": {"n": len(dw), "ids": [d.id for d in dw]}}
    settings = {"n_boot": n_boot, "n_perm": n_perm, "level": level, "seed": seed,
                "interval": "percentile bootstrap", "tests": "Welch t, Mann-Whitney U, paired sign-flip permutation",
                "effect_sizes": "Hedges' g (Welch), rank-biserial r (Mann-Whitney), Cohen's d_z (paired)"}
    return Comparison(L, groups, pairing, metrics, scores, settings, ids, dc[0].model_layers)
