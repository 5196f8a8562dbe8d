"""Chain length in an evaluation: each arm's gain by the length of the baseline's reasoning, the trend test, and
what each arm did to the chain itself (steps, tokens, closed or budget-forced).

Everything is over problems, like the rest of the summary: a problem's samples are averaged first.

- Length of a problem: the mean, over its reference-arm (baseline) samples, of `thinking_steps` (or
  `thinking_tokens`). Only the reference arm decides it, so an arm's own effect on length cannot move a problem
  into another bin.
- Bins: `bins` quantile bins of the problems' lengths (3: tertiles), or explicit ascending edges. A problem of
  length L is in bin i when edge[i-1] < L <= edge[i] (the first bin takes everything up to its edge).
- Per bin: the problems, each arm's accuracy ± SE, and each arm minus the reference with a paired bootstrap CI
  and a sign-flip permutation p-value (`stepscope.stats.paired_comparison`).
- Trend: does the gain grow with length? Spearman's rank correlation between a problem's paired gain (arm minus
  reference accuracy) and its reference length, with a permutation p-value that shuffles the gains over the
  problems (the unit resampled is the problem), two-sided. Ranks, because chain lengths are skewed (a few very
  long chains would dominate a least-squares fit) and the question is "larger with longer", not "linear". The
  least-squares slope of the gain on the length, with a paired bootstrap CI over problems, gives the size in
  accuracy per 100 steps or per 1,000 tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import StepscopeError
from ..stats import correlation_permutation_test, mean_se, ols_slope, paired_bootstrap_ci, paired_comparison

# length measure -> (record field, unit, the slope's scale: gain per SCALE units)
MEASURES = {"steps": ("thinking_steps", "steps", 100), "tokens": ("thinking_tokens", "tokens", 1000)}
DEFAULT_BINS = 3


def parse_bins(spec: str | int | Sequence[float] | None) -> int | list[float]:
    """`--length-bins`: a number of quantile bins ("3": tertiles), or ascending edges with a comma ("200,800":
    three bins; "200,": two)."""
    if spec is None:
        return DEFAULT_BINS
    if isinstance(spec, int) or (isinstance(spec, str) and "," not in spec):
        try:
            n = int(spec)
        except ValueError:
            raise StepscopeError(f"--length-bins {spec!r}: give a number of bins (3) or ascending edges (200,800)") \
                from None
        if n < 1:
            raise StepscopeError(f"--length-bins must be at least 1, got {n}")
        return n
    parts = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    try:
        edges = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise StepscopeError(f"--length-bins {spec!r}: edges must be numbers, like 200,800") from None
    if not edges or any(not math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise StepscopeError(f"--length-bins {spec!r}: edges must be finite and strictly ascending")
    return edges


def assign_bins(lengths: np.ndarray, bins: int | Sequence[float]) -> tuple[np.ndarray, list[float]]:
    """([P] bin of each problem, the inner edges): bin i holds edge[i-1] < L <= edge[i]."""
    lengths = np.asarray(lengths, dtype=np.float64)  # [P]
    if isinstance(bins, int):
        edges = [float(e) for e in np.quantile(lengths, np.arange(1, bins) / bins)] if lengths.size else []
    else:
        edges = [float(e) for e in bins]
    return np.searchsorted(np.asarray(edges, dtype=np.float64), lengths, side="left"), edges


def _field_means(records: list[dict], complete: list[str], arm: str, field: str) -> np.ndarray | None:
    """[P] mean of a numeric record field over each complete problem's samples in `arm`; None if any lacks it."""
    values: dict[str, list[float]] = {p: [] for p in complete}
    for r in records:
        pid = str(r["problem_id"])
        if r["arm"] == arm and pid in values:
            v = r.get(field)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return None
            values[pid].append(float(v))
    return np.array([np.mean(values[p]) for p in complete], dtype=np.float64)


def _share_means(records: list[dict], complete: list[str], arm: str, test) -> np.ndarray | None:
    """[P] share of each complete problem's samples in `arm` for which `test(record)` holds (None: unknown)."""
    values: dict[str, list[float]] = {p: [] for p in complete}
    for r in records:
        pid = str(r["problem_id"])
        if r["arm"] == arm and pid in values:
            v = test(r)
            if v is None:
                return None
            values[pid].append(float(v))
    return np.array([np.mean(values[p]) for p in complete], dtype=np.float64)


def _trend(gain: np.ndarray, length: np.ndarray, scale: float, level: float, n_boot: int, n_perm: int,
           seed: int) -> dict:
    """Spearman's rho of gain on length with its permutation p, and the OLS slope (per `scale` units) with a CI."""
    test = correlation_permutation_test(length, gain, method="spearman", n_perm=n_perm, seed=seed)
    ci = paired_bootstrap_ci(gain, length, statistic=ols_slope, level=level, n_boot=n_boot, seed=seed)

    def scaled(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v) * scale

    return {"spearman_rho": test.statistic, "p_value": test.p_value, "exact": test.extra.get("exact"),
            "slope": scaled(ci.estimate), "slope_ci_low": scaled(ci.low), "slope_ci_high": scaled(ci.high),
            "level": level, "n_problems": int(gain.size)}


def gain_by_length(records: list[dict], complete: list[str], per_problem: dict[str, np.ndarray], reference: str, *,
                   measure: str = "steps", bins: int | Sequence[float] = DEFAULT_BINS, level: float = 0.95,
                   n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0) -> dict:
    """Each arm's accuracy and gain over the reference by bins of the reference's chain length (module docstring).

    `complete`: the problem ids in the statistics; `per_problem`: arm -> [P] accuracy of those problems.
    `measure` "steps" falls back to "tokens" when a record lacks `thinking_steps` (a run written before they
    were recorded), and says so; without either, the section says why it is unavailable.
    """
    if measure not in MEASURES:
        raise StepscopeError(f"--length-by must be one of {', '.join(MEASURES)}, got {measure!r}")
    out: dict = {"measure": measure, "binned_on": reference, "available": False}
    if reference not in per_problem:
        out["reason"] = f"no {reference} arm to measure the chains of"
        return out
    lengths = {m: _field_means(records, complete, reference, MEASURES[m][0]) for m in MEASURES}
    if lengths[measure] is None:
        other = next((m for m in MEASURES if m != measure and lengths[m] is not None), None)
        if other is None:
            out["reason"] = "the records carry no thinking length (steps or tokens)"
            return out
        out["note"] = f"the records carry no thinking {measure}: binned by thinking {other}"
        measure = other
    length = lengths[measure]  # [P] the reference's mean length of each problem
    which, edges = assign_bins(length, bins)
    field, unit, scale = MEASURES[measure]
    out.update(available=True, measure=measure, unit=unit, field=field, edges=edges,
               bins_spec=bins if isinstance(bins, int) else [float(e) for e in bins], slope_per=scale, bins=[])
    arms = [a for a in per_problem if a != reference]
    for i in range(len(edges) + 1):
        idx = np.flatnonzero(which == i)
        b: dict = {"index": i, "n_problems": int(idx.size), "low_edge": edges[i - 1] if i else None,
                   "high_edge": edges[i] if i < len(edges) else None}
        if idx.size:
            b.update(min_length=float(length[idx].min()), max_length=float(length[idx].max()),
                     mean_length={m: float(v[idx].mean()) for m, v in lengths.items() if v is not None},
                     arms={a: dict(zip(("accuracy", "se"), mean_se(acc[idx]))) for a, acc in per_problem.items()},
                     comparisons={a: paired_comparison(per_problem[a][idx], per_problem[reference][idx], level=level,
                                                       n_boot=n_boot, n_perm=n_perm, seed=seed) for a in arms})
        out["bins"].append(b)
    out["trend"] = {a: _trend(per_problem[a] - per_problem[reference], length, scale, level, n_boot, n_perm, seed)
                    for a in arms}
    out["per_problem_length"] = {p: float(v) for p, v in zip(complete, length)}
    return out


def _closed(r: dict) -> bool | None:
    """Closed on its own (not by budget forcing); None when the record does not say whether it was forced."""
    forced = r.get("budget_forced")
    return None if forced is None else bool(r.get("thinking_closed")) and not forced


def _forced(r: dict) -> bool | None:
    forced = r.get("budget_forced")
    return None if forced is None else bool(forced)


def _unclosed(r: dict) -> bool:
    return not r.get("thinking_closed")


# what the chain section reports per arm: name -> how a problem's value is made from its samples
CHAIN_FIELDS = {
    "thinking_steps": lambda recs, done, arm: _field_means(recs, done, arm, "thinking_steps"),
    "thinking_tokens": lambda recs, done, arm: _field_means(recs, done, arm, "thinking_tokens"),
    "closed_share": lambda recs, done, arm: _share_means(recs, done, arm, _closed),
    "budget_forced_share": lambda recs, done, arm: _share_means(recs, done, arm, _forced),
    "unclosed_share": lambda recs, done, arm: _share_means(recs, done, arm, _unclosed),
}


def chain_effect(records: list[dict], complete: list[str], arms: list[str], reference: str, *, level: float = 0.95,
                 n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0) -> dict:
    """Per arm, its chains (thinking steps and tokens, the shares closed on their own, budget-forced and never
    closed) as mean ± SE over problems; each arm minus the reference, paired over problems, with a CI.
    A quantity that some record lacks is None (unavailable), never estimated from the others."""
    values = {a: {k: f(records, complete, a) for k, f in CHAIN_FIELDS.items()} for a in arms}
    out: dict = {"arms": {}, "comparisons": {}, "reference": reference}
    for a in arms:
        out["arms"][a] = {k: (None if v is None else dict(zip(("mean", "se"), mean_se(v))))
                          for k, v in values[a].items()}
    if reference in arms and complete:
        for a in arms:
            if a == reference:
                continue
            out["comparisons"][a] = {
                k: (None if values[a][k] is None or values[reference][k] is None else
                    paired_comparison(values[a][k], values[reference][k], level=level, n_boot=n_boot, n_perm=n_perm,
                                      seed=seed))
                for k in CHAIN_FIELDS}
    return out
