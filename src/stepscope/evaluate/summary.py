"""The summary of a run folder: per-arm accuracy and pass@k (mean ± SE over problems), paired comparisons with
the reference arm, and their tables (summary.json, summary.md, the paper-shaped table).

Every quantity is computed over problems: a problem's samples are averaged first, so a problem with more
samples does not weigh more, and the standard error reflects the number of problems (the unit that was
sampled from the world), not the number of generations. Only problems with every sample in every arm enter
the statistics (an interrupted run is summarized over its finished problems, and says so). Each other arm
is compared with the reference arm (baseline) problem by problem, as arm - reference: the mean difference,
a paired percentile bootstrap CI over problems, and a paired sign-flip permutation p-value
(`stepscope.stats`).

Records may carry extra per-problem fields (a difficulty, a platform...): `summarize(..., by=[field])` adds
the per-arm accuracy of each value of the field.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import StepscopeError
from ..io import atomic_write_json, atomic_write_text
from ..stats import EXACT_PERMUTATION_MAX, paired_bootstrap_ci, paired_permutation_test
from ..wording import plural
from .benchmarks import benchmark_title
from .grading import GRADER_ERROR
from .runfolder import load_run

ARM_NAMES = {"baseline": "baseline", "stepflow": "StepFlow", "oeb": "OEB only", "smi": "SMI only"}
BREAKDOWNS = ("difficulty", "platform")  # per-record fields broken down by default where records carry them


def arm_label(arm: str) -> str:
    return ARM_NAMES.get(arm, arm)


def model_label(model: str) -> str:
    if model == "default":
        from ..models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(str(model).rstrip("/")).name or str(model)


# ------------------------------------------------------------------------- pass@k and mean ± SE

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k), computed as a stable product: 1 - prod_{i=n-c+1..n} (1 - k/i).
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise StepscopeError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_values(n: int) -> list[int]:
    """The k reported for n samples: the powers of two up to n (1, 2, 4, ...)."""
    return [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []


def mean_se(x: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(P)); SE is nan for fewer than 2 values."""
    x = np.asarray(x, dtype=np.float64)  # [P]
    if x.size == 0:
        return math.nan, math.nan
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return float(x.mean()), se


def per_problem_means(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    """[P] accuracy of each problem: the mean over its samples (a problem may have any number >= 1)."""
    if any(len(c) == 0 for c in correct):
        raise StepscopeError("every problem needs at least one sample")
    return np.array([np.mean(np.asarray(c, dtype=np.float64)) for c in correct], dtype=np.float64)


def per_problem_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> np.ndarray:
    """[P] unbiased pass@k of each problem from its own samples."""
    return np.array([pass_at_k(len(c), int(np.sum(np.asarray(c, dtype=bool))), k) for c in correct],
                    dtype=np.float64)


# ------------------------------------------------------------------------------------- the summary

def _outcomes(records: list[dict]) -> tuple[list[str], dict[tuple[str, str], dict[int, bool]]]:
    """(problem ids in first-seen order, (problem, arm) -> sample -> correct)."""
    by: dict[tuple[str, str], dict[int, bool]] = defaultdict(dict)
    order: dict[str, None] = {}
    for r in records:
        pid = str(r["problem_id"])
        order.setdefault(pid)
        by[(pid, r["arm"])][int(r["sample"])] = bool(r["correct"])
    return list(order), by


def _arm_summary(cor: list[list[bool]], recs: list[dict], n: int, config) -> dict:
    """Accuracy, pass@k and generation statistics of one arm over the complete problems (`cor`: [P][n])."""
    m, se = mean_se(per_problem_means(cor))
    return {
        "accuracy": m, "se": se,
        "pass_at_k": {str(k): dict(zip(("mean", "se"), mean_se(per_problem_pass_at_k(cor, k))))
                      for k in pass_at_k_values(n)},
        "thinking_closed_rate": float(np.mean([bool(r.get("thinking_closed")) for r in recs])),
        "grade_timeouts": int(sum(bool(r.get("grade_timed_out")) for r in recs)),
        "grader_errors": int(sum(r.get("status") == GRADER_ERROR for r in recs)),
        "mean_new_tokens": float(np.mean([r.get("new_tokens") or 0 for r in recs])),
        "mean_thinking_tokens": float(np.mean([r.get("thinking_tokens") or 0 for r in recs])),
        "mean_time": _mean_or_none([r.get("time") for r in recs]),
        "config": config,
    }


def _comparison(arm: np.ndarray, ref: np.ndarray, reference: str, level: float, n_boot: int, n_perm: int,
                seed: int) -> dict:
    """arm - reference over problems ([P] per-problem accuracies each): the paired difference, CI and p."""
    ci = paired_bootstrap_ci(arm, ref, level=level, n_boot=n_boot, seed=seed)
    test = paired_permutation_test(arm, ref, n_perm=n_perm, seed=seed)
    # one problem: every bootstrap resample is that problem, so the interval is the point itself
    low, high = (ci.estimate, ci.estimate) if ci.low is None else (ci.low, ci.high)
    return {"reference": reference, "diff": ci.estimate, "ci_low": low, "ci_high": high, "level": level,
            "p_value": test.p_value, "n_problems": int(arm.size), "wins": int(np.sum(arm > ref)),
            "losses": int(np.sum(arm < ref))}


def _breakdown(field: str, records: list[dict], complete: list[str], per_problem: dict[str, np.ndarray]) -> dict:
    """Per value of a per-record field: the complete problems with that value and each arm's accuracy ± SE."""
    value: dict[str, str] = {}
    for r in records:
        value.setdefault(str(r["problem_id"]), str(r.get(field)))
    groups: dict[str, list[int]] = defaultdict(list)  # field value -> indices into `complete`
    for i, pid in enumerate(complete):
        groups[value[pid]].append(i)
    return {v: {"n_problems": len(idx),
                "arms": {a: dict(zip(("accuracy", "se"), mean_se(acc[idx]))) for a, acc in per_problem.items()}}
            for v, idx in groups.items()}


def summarize(records: list[dict], run_info: dict, *, reference: str = "baseline", level: float = 0.95,
              n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0, by: Sequence[str] | None = None) -> dict:
    """The summary dict of a run (see the module docstring); `records` are results.jsonl lines.

    `by`: per-record fields to break the accuracy down by (the summary's "by" entry, one per field); None:
    those of BREAKDOWNS that the records carry (LiveCodeBench's difficulty and platform).
    """
    if by is None:
        by = [f for f in BREAKDOWNS if any(f in r for r in records)]
    arms = list(run_info["arms"])
    n = int(run_info["n_samples"])
    order, outcome = _outcomes(records)
    complete = [p for p in order if all(len(outcome[(p, a)]) == n for a in arms)]
    expected = int(run_info.get("n_problems", len(order)))
    out: dict = {
        "model": run_info["model"], "benchmark": run_info["benchmark"],
        "benchmark_source": run_info.get("benchmark_source"), "n_samples": n,
        "n_problems": len(complete), "n_problems_expected": expected,
        "complete": len(complete) == expected and len(records) == expected * n * len(arms),
        "n_records": len(records), "arms": {}, "comparisons": {},
        # samples whose grading failed inside the grader: counted as wrong, named here
        "grader_errors": [{k: r.get(k) for k in ("problem_id", "arm", "sample")} | {"error": (r.get("failure") or {})
                          .get("error")} for r in records if r.get("status") == GRADER_ERROR],
        "decoding": {k: run_info.get(k) for k in ("temperature", "top_p", "max_new_tokens", "max_thinking_tokens",
                                                  "seed", "prompt_style")
                     + (("top_k",) if run_info.get("top_k") else ())},  # top_k shown where it was on
        "method": {"accuracy": "mean over samples per problem, then mean over problems; ± standard error over "
                               "problems", "pass_at_k": "unbiased estimator (Chen et al. 2021) per problem, "
                                                       "mean ± SE over problems",
                   "ci": f"paired percentile bootstrap over problems, {n_boot} resamples, level {level}",
                   "p_value": f"paired sign-flip permutation test, two-sided (exact for <= "
                              f"{max(EXACT_PERMUTATION_MAX, int(math.log2(n_perm)))} problems, else {n_perm} "
                              f"random sign vectors)"},
    }
    if not complete:
        return out
    complete_set = set(complete)
    per_problem: dict[str, np.ndarray] = {}  # arm -> [P] accuracy of each complete problem
    for a in arms:
        cor = [[outcome[(p, a)][s] for s in range(n)] for p in complete]
        per_problem[a] = per_problem_means(cor)
        recs = [r for r in records if r["arm"] == a and str(r["problem_id"]) in complete_set]
        out["arms"][a] = _arm_summary(cor, recs, n, run_info["arms"][a])
    if reference in arms:
        for a in arms:
            if a != reference:
                out["comparisons"][a] = _comparison(per_problem[a], per_problem[reference], reference, level,
                                                    n_boot, n_perm, seed)
    out["per_problem"] = {p: {a: float(per_problem[a][i]) for a in arms} for i, p in enumerate(complete)}
    if by:
        out["by"] = {f: _breakdown(f, records, complete, per_problem) for f in by}
    return out


def _mean_or_none(xs: list) -> float | None:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return float(np.mean(xs)) if xs else None


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def markdown(summary: dict) -> str:
    """The summary as Markdown: the paper-shaped comparison table, then per-arm accuracy and pass@k."""
    model, bench = model_label(summary["model"]), benchmark_title(summary["benchmark"])
    lines = [f"# {model} on {bench}", ""]
    if not summary["arms"]:
        lines.append(f"No problem has all its samples in every arm yet ({summary['n_records']} records).")
        return "\n".join(lines) + "\n"
    arms = summary["arms"]
    for a, c in summary["comparisons"].items():
        ref = c["reference"]
        lines += [f"| model | benchmark | {arm_label(ref)} | {arm_label(a)} | diff [{round(100 * c['level'])}% CI] | p |",
                  "|---|---|---|---|---|---|",
                  f"| {model} | {bench} | {_pct(arms[ref]['accuracy'])} ± {_pct(arms[ref]['se'])} | "
                  f"{_pct(arms[a]['accuracy'])} ± {_pct(arms[a]['se'])} | {_signed(c['diff'])} "
                  f"[{_signed(c['ci_low'])}, {_signed(c['ci_high'])}] | {_p(c['p_value'])} |", ""]
    ks = list(next(iter(arms.values()))["pass_at_k"])
    lines += ["| arm | accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | thinking closed | new tokens |",
              "|---|---|" + "---|" * len(ks) + "---|---|"]
    for a, s in arms.items():
        cells = " | ".join(f"{_pct(s['pass_at_k'][k]['mean'])} ± {_pct(s['pass_at_k'][k]['se'])}" for k in ks)
        lines.append(f"| {arm_label(a)} | {_pct(s['accuracy'])} ± {_pct(s['se'])} | {cells} | "
                     f"{_pct(s['thinking_closed_rate'], 0)}% | {s['mean_new_tokens']:.0f} |")
    for name, groups in summary.get("by", {}).items():  # accuracy by a per-record field
        lines += ["", f"| {name} | problems | " + " | ".join(arm_label(a) for a in arms) + " |",
                  "|---|---|" + "---|" * len(arms)]
        for value, g in groups.items():
            lines.append(f"| {value} | {g['n_problems']} | " + " | ".join(
                f"{_pct(g['arms'][a]['accuracy'])} ± {_pct(g['arms'][a]['se'])}" for a in arms) + " |")
    errors = summary.get("grader_errors") or []
    if errors:
        lines += ["", f"{len(errors)} sample(s) could not be graded (grading failed inside the grader; counted as "
                      "wrong): " + "; ".join(f"{e['problem_id']} ({e['arm']}, sample {e['sample']}): {e['error']}"
                                             for e in errors[:10]) + ("; ..." if len(errors) > 10 else "")]
    dec = summary["decoding"]
    note = (f"{summary['n_problems']} problems" +
            ("" if summary["complete"] else f" of {summary['n_problems_expected']} (run incomplete)") +
            f", {plural(summary['n_samples'], 'sample')} each; temperature {dec['temperature']}, top-p {dec['top_p']}, " +
            (f"top-k {dec['top_k']}, " if dec.get("top_k") else "") +
            f"up to {dec['max_new_tokens']} new tokens" +
            (f" ({dec['max_thinking_tokens']} thinking)" if dec.get("max_thinking_tokens") else "") +
            f"; source: {summary['benchmark_source']}.")
    lines += ["", "Accuracy in %: mean over samples, ± standard error over problems. diff: paired per-problem "
              "difference with a percentile bootstrap CI over problems; p: paired sign-flip permutation test.",
              note]
    return "\n".join(lines) + "\n"


def write_summary(out: str | os.PathLike, **kwargs) -> dict:
    """Summarize a run folder into summary.json and summary.md; returns the summary."""
    info, records = load_run(out)
    summary = summarize(records, info, **kwargs)
    atomic_write_json(Path(out) / "summary.json", summary)
    atomic_write_text(Path(out) / "summary.md", markdown(summary))
    return summary


def paper_table(summaries: list[dict], arm: str = "stepflow", reference: str = "baseline",
                labels: list[str] | None = None) -> str:
    """One row per model, one column per benchmark, cells "base → arm" (the paper's main table, §6).

    Two runs of the same model and benchmark get a row each, named by their `labels` (the run folders; default
    "run 1", "run 2", ... in the order given), so no cell hides another.
    """
    labels = [f"run {i + 1}" for i in range(len(summaries))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(summaries):
        raise StepscopeError(f"{len(labels)} labels for {len(summaries)} summaries")
    runs = Counter((model_label(s["model"]), s["benchmark"]) for s in summaries)
    shared = {m for (m, _), n in runs.items() if n > 1}  # models with a benchmark run more than once
    models: list[str] = []
    benches: list[str] = []
    cell: dict[tuple[str, str], str] = {}
    for s, label in zip(summaries, labels):
        m, b = model_label(s["model"]), s["benchmark"]
        if m in shared:
            m = f"{m} ({label})"
        models += [m] if m not in models else []
        benches += [b] if b not in benches else []
        arms = s["arms"]
        if reference in arms and arm in arms:
            c = s["comparisons"].get(arm)
            star = "*" if c and c["p_value"] < 0.05 else ""
            cell[(m, b)] = f"{_pct(arms[reference]['accuracy'])} → {_pct(arms[arm]['accuracy'])}{star}"
    head = "| model | " + " | ".join(benchmark_title(b) for b in benches) + " |"
    lines = [head, "|---|" + "---|" * len(benches)]
    for m in models:
        lines.append(f"| {m}, {arm_label(reference)} → {arm_label(arm)} | " +
                     " | ".join(cell.get((m, b), "") for b in benches) + " |")
    return "\n".join(lines) + "\n\n* p < 0.05, paired sign-flip permutation test over problems.\n"
