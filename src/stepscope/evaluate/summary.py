"""Summaries of a run folder: per-arm accuracy and pass@k (mean ± SE over problems), paired comparisons, tables.

Only problems with every sample in every arm enter the statistics (an interrupted run is summarized over
its finished problems, and says so). Accuracy is the mean over samples: each problem's samples are
averaged first, then the problems; ± is the standard error over problems. Each other arm is compared with
the reference arm (baseline) problem by problem: the mean difference, a paired percentile bootstrap CI
over problems, and a paired sign-flip permutation p-value.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import StepscopeError
from ..io import atomic_write_json, atomic_write_text, read_text_file
from .stats import (
    EXACT_PERMUTATION_MAX_PROBLEMS,
    mean_se,
    paired_bootstrap_ci,
    paired_permutation_test,
    pass_at_k_values,
    per_problem_means,
    per_problem_pass_at_k,
)

ARM_NAMES = {"baseline": "baseline", "stepflow": "StepFlow", "oeb": "OEB only", "smi": "SMI only"}
BENCH_NAMES = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH-500",
               "math500-mmath": "MATH-500 (MMATH 311)", "gsm8k": "GSM8K", "gpqa-diamond": "GPQA-D"}


def arm_label(arm: str) -> str:
    return ARM_NAMES.get(arm, arm)


def model_label(model: str) -> str:
    if model == "default":
        from ..models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(str(model).rstrip("/")).name or str(model)


def summarize(records: list[dict], run_info: dict, *, reference: str = "baseline", level: float = 0.95,
              n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0) -> dict:
    """The summary dict of a run (see the module docstring); `records` are results.jsonl lines."""
    arms = list(run_info["arms"])
    n = int(run_info["n_samples"])
    by: dict[tuple[str, str], dict[int, bool]] = defaultdict(dict)  # (problem, arm) -> sample -> correct
    order: list[str] = []
    for r in records:
        pid = str(r["problem_id"])
        if pid not in order:
            order.append(pid)
        by[(pid, r["arm"])][int(r["sample"])] = bool(r["correct"])
    complete = [p for p in order if all(len(by[(p, a)]) == n for a in arms)]
    expected = int(run_info.get("n_problems", len(order)))
    out: dict = {
        "model": run_info["model"], "benchmark": run_info["benchmark"],
        "benchmark_source": run_info.get("benchmark_source"), "n_samples": n,
        "n_problems": len(complete), "n_problems_expected": expected,
        "complete": len(complete) == expected and len(records) == expected * n * len(arms),
        "n_records": len(records), "arms": {}, "comparisons": {},
        "decoding": {k: run_info.get(k) for k in ("temperature", "top_p", "max_new_tokens", "max_thinking_tokens",
                                                  "seed", "prompt_style")},
        "method": {"accuracy": "mean over samples per problem, then mean over problems; ± standard error over "
                               "problems", "pass_at_k": "unbiased estimator (Chen et al. 2021) per problem, "
                                                       "mean ± SE over problems",
                   "ci": f"paired percentile bootstrap over problems, {n_boot} resamples, level {level}",
                   "p_value": f"paired sign-flip permutation test, two-sided (exact for <= "
                              f"{EXACT_PERMUTATION_MAX_PROBLEMS} problems, else {n_perm} random sign vectors)"},
    }
    if not complete:
        return out
    per_problem: dict[str, np.ndarray] = {}
    complete_set = set(complete)
    for a in arms:
        cor = [[by[(p, a)][s] for s in range(n)] for p in complete]
        acc = per_problem_means(cor)  # [P]
        per_problem[a] = acc
        m, se = mean_se(acc)
        recs = [r for r in records if r["arm"] == a and str(r["problem_id"]) in complete_set]
        out["arms"][a] = {
            "accuracy": m, "se": se,
            "pass_at_k": {str(k): dict(zip(("mean", "se"), mean_se(per_problem_pass_at_k(cor, k))))
                          for k in pass_at_k_values(n)},
            "thinking_closed_rate": float(np.mean([bool(r.get("thinking_closed")) for r in recs])),
            "grade_timeouts": int(sum(bool(r.get("grade_timed_out")) for r in recs)),
            "mean_new_tokens": float(np.mean([r.get("new_tokens") or 0 for r in recs])),
            "mean_thinking_tokens": float(np.mean([r.get("thinking_tokens") or 0 for r in recs])),
            "mean_time": _mean_or_none([r.get("time") for r in recs]),
            "config": run_info["arms"][a],
        }
    if reference in arms:
        for a in arms:
            if a == reference:
                continue
            d, lo, hi = paired_bootstrap_ci(per_problem[reference], per_problem[a], level=level, n_boot=n_boot,
                                            seed=seed)
            p = paired_permutation_test(per_problem[reference], per_problem[a], n_perm=n_perm, seed=seed)
            out["comparisons"][a] = {"reference": reference, "diff": d, "ci_low": lo, "ci_high": hi,
                                     "level": level, "p_value": p, "n_problems": len(complete),
                                     "wins": int(np.sum(per_problem[a] > per_problem[reference])),
                                     "losses": int(np.sum(per_problem[a] < per_problem[reference]))}
    out["per_problem"] = {p: {a: float(per_problem[a][i]) for a in arms} for i, p in enumerate(complete)}
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
    model, bench = model_label(summary["model"]), BENCH_NAMES.get(summary["benchmark"], summary["benchmark"])
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
    dec = summary["decoding"]
    note = (f"{summary['n_problems']} problems" +
            ("" if summary["complete"] else f" of {summary['n_problems_expected']} (run incomplete)") +
            f", {summary['n_samples']} samples each; temperature {dec['temperature']}, top-p {dec['top_p']}, "
            f"up to {dec['max_new_tokens']} new tokens" +
            (f" ({dec['max_thinking_tokens']} thinking)" if dec.get("max_thinking_tokens") else "") +
            f"; source: {summary['benchmark_source']}.")
    lines += ["", "Accuracy in %: mean over samples, ± standard error over problems. diff: paired per-problem "
              "difference with a percentile bootstrap CI over problems; p: paired sign-flip permutation test.",
              note]
    return "\n".join(lines) + "\n"


def load_run(out: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(run.json, records) of a run folder."""
    from .runner import read_results

    out = Path(out)
    path = out / "run.json"
    if not path.exists():
        raise StepscopeError(f"{out}: no run.json (not a stepscope eval folder)")
    try:
        info = json.loads(read_text_file(path))
    except json.JSONDecodeError as e:
        raise StepscopeError(f"{path}: not valid JSON ({e.msg})") from None
    return info, read_results(out)


def write_summary(out: str | os.PathLike, **kwargs) -> dict:
    """Summarize a run folder into summary.json and summary.md; returns the summary."""
    info, records = load_run(out)
    summary = summarize(records, info, **kwargs)
    atomic_write_json(Path(out) / "summary.json", summary)
    atomic_write_text(Path(out) / "summary.md", markdown(summary))
    return summary


def paper_table(summaries: list[dict], arm: str = "stepflow", reference: str = "baseline") -> str:
    """One row per model, one column per benchmark, cells "base → arm" (the paper's main table, §6)."""
    models: list[str] = []
    benches: list[str] = []
    cell: dict[tuple[str, str], str] = {}
    for s in summaries:
        m, b = model_label(s["model"]), s["benchmark"]
        models += [m] if m not in models else []
        benches += [b] if b not in benches else []
        arms = s["arms"]
        if reference in arms and arm in arms:
            c = s["comparisons"].get(arm)
            star = "*" if c and c["p_value"] < 0.05 else ""
            cell[(m, b)] = f"{_pct(arms[reference]['accuracy'])} → {_pct(arms[arm]['accuracy'])}{star}"
    head = "| model | " + " | ".join(BENCH_NAMES.get(b, b) for b in benches) + " |"
    lines = [head, "|---|" + "---|" * len(benches)]
    for m in models:
        lines.append(f"| {m}, {arm_label(reference)} → {arm_label(arm)} | " +
                     " | ".join(cell.get((m, b), "") for b in benches) + " |")
    return "\n".join(lines) + "\n\n* p < 0.05, paired sign-flip permutation test over problems.\n"
