"""Shallow Lock-in and Deep Decay metrics (docs/method.md §4) per layer of step maps, and the three scores.

Input: step maps `M` [L, S, S] (pooled saliency, row i = query step, column j = key step) and the kind of every
step ("question", "thinking" or "summary", in that order). `N[l][i, :] = M[l][i, :] / sum_j M[l][i, j]`.

Decisions (ours, where the method is silent):
- `question_reach` sums N over every question step (the question is one step unless it was split).
- `thinking_recency` is the per-row share (last 3 thinking steps / all thinking) averaged over summary rows;
  it needs at least 4 thinking steps (with 3 or fewer the share is 1 by construction, not a measurement).
- Rows whose saliency sums to 0 have no N and are left out of the means (counted in `rows`).
- Block intensities average M over the whole block, causally masked (zero) cells included.
- `decay_slope` is the least-squares slope per layer index over the deep half of the layers (at least 2
  layers); `lock_in_score` averages `locality` over the shallow quarter. A third score,
  `deep_summary_to_thinking`, averages `summary_to_thinking` over the deep quarter: a summary that reads little
  thinking in every deep layer has decayed even when the slope is flat. The bands are `stepscope.layers`'.
- Bad directions (for flags against a baseline): high locality / summary_self / thinking_recency /
  final_block_intensity / final_heat_anomaly / lock_in_score, low question_reach / far_reach /
  summary_to_thinking / decay_slope. analysis_block_intensity gets a z-score but no flag (the paper gives it
  no direction).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import StepscopeError
from ..layers import layer_bands
from ..segment import KINDS

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
JSON_VERSION = 1  # of the diagnosis, profile and comparison JSON


def layer_groups(num_layers: int, layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """The shallow quarter, deep quarter and deep half of a model's layers (`stepscope.layers.layer_bands`), as
    positions in `layers` (the model layer of each map; default all layers, so positions = layer indices).

    A group keeps only the computed layers that fall in it, maybe none.
    """
    ids = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    return {name: [k for k, x in enumerate(ids) if x in band] for name, band in layer_bands(num_layers).items()}


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




def _nanmean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else math.nan



def compute_metrics(maps: Any, step_kinds: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str],
                                                                     dict[str, int]]:
    """Every docs/method.md §4 metric per layer: ({name: float64 [L] with NaN where null}, {name: reason}, row counts).

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
                reasons[name] = f"{what} at layer{'s' if len(layers) > 1 else ''} {format_ranges(layers)}"
    if "lock_in" in zero_rows:
        note(LOCK_IN_METRICS, zero_rows["lock_in"], "every eligible thinking row has zero saliency")
    if "summary" in zero_rows:
        note(DECAY_METRICS, zero_rows["summary"], "every summary row has zero saliency")
    if "recency" in zero_rows:
        note(["thinking_recency"], zero_rows["recency"], "no summary row puts saliency on the thinking")
    if "anomaly" in zero_rows:
        note(["final_heat_anomaly"], zero_rows["anomaly"], "the thinking block has zero saliency")
    return out, reasons, rows


def format_ranges(xs: list[int]) -> str:
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
    scores["lock_in_score"], why = _band_mean(metrics, "locality", groups, "shallow")
    if why:
        reasons["lock_in_score"] = why
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
    scores["deep_summary_to_thinking"], why = _band_mean(metrics, "summary_to_thinking", groups, "deep")
    if why:
        reasons["deep_summary_to_thinking"] = why
    return scores, reasons


def _band_mean(metrics: dict[str, np.ndarray], name: str, groups: dict[str, list[int]], band: str
               ) -> tuple[float, str | None]:
    """The mean of a metric's non-null values over the computed layers of a band; NaN and why when none."""
    x = metrics[name][groups[band]]
    x = x[np.isfinite(x)]
    if x.size:
        return float(x.mean()), None
    return math.nan, (f"{name} is null in every {band} layer" if groups[band] else f"no {band} layer was computed")

