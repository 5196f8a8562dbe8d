"""Group comparison of correct and wrong traces, metric by metric and layer by layer: bootstrap intervals,
Welch and Mann-Whitney tests with effect sizes, paired tests over shared problems, and adjustment across layers.
Differences are wrong - correct (treatment - control, the convention of `stepscope.stats`).

The unit is the problem: traces of one problem (samples, arms) are not independent, so a group's traces of
one problem are averaged first and every interval and test resamples problems (a trace without a problem key
is a problem of its own). `warnings` say when a group is too small or dominated by one problem, and when no
problem is in both groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StepscopeError
from ..wording import plural
from .diagnosis import Diagnosis, diagnose
from .metrics import JSON_VERSION, METRICS, SCORES, format_ranges, layer_groups

MULTIPLE_COMPARISONS_NOTE = (
    "Each metric is tested at every layer, so p-values are also given adjusted across the layers of that "
    "metric: p_holm (Holm, family-wise error) and q_bh (Benjamini-Hochberg, false discovery rate). The nine "
    "metrics overlap (they are built from the same maps), so no adjustment across metrics is made; read a "
    "single unadjusted p < 0.05 among hundreds of tests as noise.")
UNIT_NOTE = ("unit: the problem; a group's traces of one problem (samples, arms) are averaged first, so means, "
             "intervals and tests resample problems, not traces")
MIN_PROBLEMS = 5  # fewer problems in a group: a warning (the tests then say little)
DOMINANT_SHARE = 0.5  # one problem holding more than this share of a group's traces: a warning


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
    warnings: list[str] | None = None  # what makes the statistics weak (small groups, one problem, no pairs)

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
                "warnings": list(self.warnings or []), "metrics": self.metrics, "scores": self.scores}

    def curve(self, name: str, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, low, high) float64 [L] of a metric in a group ("correct" or "wrong"); NaN where null."""
        def get(row: dict, k: str) -> float:
            g = row[group]
            return np.nan if g is None or g[k] is None else g[k]
        rows = self.metrics[name]
        return tuple(np.array([get(r, k) for r in rows], dtype=np.float64) for k in ("estimate", "low", "high"))

    def table(self, alpha: float = 0.05) -> str:
        """Text summary: scores, then per metric the layers where Welch's Holm-adjusted p < alpha."""
        def group(g: str) -> str:
            n, k = self.groups[g]["n"], self.groups[g].get("n_problems", self.groups[g]["n"])
            return f"{g}: {plural(n, 'trace')} of {plural(k, 'problem')}"
        shared = self.pairing["shared_problems"]
        lines = [f"{group('correct')}, {group('wrong')}; {plural(shared, 'problem')} in both groups"
                 + (" (paired tests on those)" if shared else "") + f"; {UNIT_NOTE}"]
        lines += [f"warning: {w}" for w in self.warnings or []]
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
    from ..stats import (
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


def _unit_keys(keys: list[str | None], tag: str) -> list[str]:
    """Each trace's unit: its problem key, or (no key) a unit of its own."""
    return [k if k is not None else f"{tag}:{i}" for i, k in enumerate(keys)]


def _per_problem(keys: list[str], values: list[float | None]) -> list[float]:
    """The mean value of each problem (its traces' non-null values averaged), in order of first appearance."""
    by: dict[str, list[float]] = {}
    for k, v in zip(keys, values):
        if v is not None:
            by.setdefault(k, []).append(v)
    return [float(np.mean(v)) for v in by.values()]


def group_warnings(name: str, keys: list[str]) -> list[str]:
    """What makes one group's statistics weak: too few problems, or one problem holding most of its traces."""
    from collections import Counter

    out = []
    counts = Counter(keys)
    if len(counts) < MIN_PROBLEMS:
        out.append(f"the {name} group holds {plural(len(counts), 'problem')} ({plural(len(keys), 'trace')}): too few for its intervals and tests to mean much "
                   f"({MIN_PROBLEMS}+ problems)")
    key, top = counts.most_common(1)[0]
    if len(keys) > 1 and top / len(keys) > DOMINANT_SHARE:
        shown = key if not key.startswith("text:") else "one problem text"
        out.append(f"{top} of the {len(keys)} {name} traces are of one problem ({shown}): the group describes "
                   "that problem more than wrong or correct traces in general")
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
    problems, Holm and Benjamini-Hochberg adjustment across layers. Differences are wrong - correct. The unit
    is the problem (meta problem_key): a group's traces of one problem are averaged before any statistic."""
    from ..stats import benjamini_hochberg, holm

    dc = [x if isinstance(x, Diagnosis) else diagnose(x) for x in correct]
    dw = [x if isinstance(x, Diagnosis) else diagnose(x) for x in wrong]
    if not dc or not dw:
        raise StepscopeError(f"compare needs at least one trace per group (correct: {len(dc)}, wrong: {len(dw)})")
    L, ids = dc[0].num_layers, dc[0].layer_ids
    for d in dc + dw:
        if d.layer_ids != ids or d.model_layers != dc[0].model_layers:
            raise StepscopeError(f"cannot compare results of different layers ({format_ranges(ids)} and "
                                 f"{format_ranges(d.layer_ids)}, {d.id or 'a trace'}): use one model and one layer set")
    kc = [d.meta.get("problem_key") for d in dc]
    kw = [d.meta.get("problem_key") for d in dw]
    shared = sorted({k for k in kc if k} & {k for k in kw if k})
    uc, uw = _unit_keys(kc, "correct-trace"), _unit_keys(kw, "wrong-trace")
    metrics: dict[str, list[dict]] = {}
    for mi, name in enumerate(METRICS):
        rows = []
        for layer in range(L):
            c = _per_problem(uc, [d.metrics[name][layer] for d in dc])
            w = _per_problem(uw, [d.metrics[name][layer] for d in dw])
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
        c = _per_problem(uc, [d.scores[name] for d in dc])
        w = _per_problem(uw, [d.scores[name] for d in dw])
        pairs = _paired_values([(k, d.scores[name]) for k, d in zip(kc, dc)],
                               [(k, d.scores[name]) for k, d in zip(kw, dw)])
        scores[name] = _group_stats(c, w, pairs, n_boot, n_perm, level, seed + 100_000 + si)
        scores[name]["values"] = {"correct": [d.scores[name] for d in dc], "wrong": [d.scores[name] for d in dw]}
    pairing = {"key": "meta problem_id, else a hash of the whitespace-normalized problem text, else meta id",
               "shared_problems": len(shared),
               "note": ("paired tests use the problems present in both groups (several traces of one problem in "
                        "a group are averaged first); unpaired tests use every trace") if shared else
                       "no problem appears in both groups: only unpaired tests"}
    groups = {"correct": {"n": len(dc), "n_problems": len(set(uc)), "ids": [d.id for d in dc]},
              "wrong": {"n": len(dw), "n_problems": len(set(uw)), "ids": [d.id for d in dw]}}
    warnings = group_warnings("correct", uc) + group_warnings("wrong", uw)
    if not shared:
        warnings.append("no problem is in both groups: they differ in their problems as well as in correctness, "
                        "and no paired test is possible")
    settings = {"n_boot": n_boot, "n_perm": n_perm, "level": level, "seed": seed, "unit": UNIT_NOTE,
                "interval": "percentile bootstrap", "tests": "Welch t, Mann-Whitney U, paired sign-flip permutation",
                "effect_sizes": "Hedges' g (Welch), rank-biserial r (Mann-Whitney), Cohen's d_z (paired)"}
    return Comparison(L, groups, pairing, metrics, scores, settings, ids, dc[0].model_layers, warnings)
