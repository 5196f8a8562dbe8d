"""The summary of a run folder: per-arm accuracy and pass@k (mean ± SE over problems), paired comparisons with
the reference arm, the gain by chain length and the effect on the chain (`chain.py`), the cost the run measured
(`cost.py`), and their tables (summary.json, summary.md, summary.html, the paper-shaped and headline tables).

Every quantity is computed over problems: a problem's samples are averaged first, so a problem with more
samples does not weigh more, and the standard error reflects the number of problems (the unit that was
sampled from the world), not the number of generations. Only problems with every sample in every arm enter
the statistics (an interrupted run is summarized over its finished problems, and says so). Each other arm
is compared with the reference arm (baseline) problem by problem, as arm - reference: the mean difference,
a paired percentile bootstrap CI over problems, and a paired sign-flip permutation p-value
(`stepscope.stats`).

Records may carry extra per-problem fields (a difficulty, a platform...): `summarize(..., by=[field])` adds
the per-arm accuracy of each value of the field. A field that a run's records lack (a run written before it
existed) makes its section say "unavailable"; nothing is estimated in its place.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.interventions import repair_arm
from ..errors import StepscopeError
from ..io import atomic_write_json, atomic_write_text
from ..stats import EXACT_PERMUTATION_MAX, mean_se, paired_comparison
from ..wording import plural
from .benchmarks import benchmark_title
from .chain import chain_effect, gain_by_length, parse_bins
from .cost import cost_summary
from .grading import GRADER_ERROR
from .runfolder import load_run

ARM_NAMES = {"baseline": "baseline", "stepflow": "StepFlow", "oeb": "OEB only", "smi": "SMI only"}
BREAKDOWNS = ("difficulty", "platform")  # per-record fields broken down by default where records carry them


def arm_label(arm: str) -> str:
    if arm in ARM_NAMES:
        return ARM_NAMES[arm]
    got = repair_arm(arm)  # a registered repair's arms (evaluate.runner.build_arms)
    if got is None:
        return arm
    title = got[0].title or got[0].name
    return f"StepFlow + {title}" if got[1] else f"{title} only"


def model_label(model: str) -> str:
    if model == "default":
        from ..models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(str(model).rstrip("/")).name or str(model)


# ------------------------------------------------------------------------------------------ pass@k

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
    c = paired_comparison(arm, ref, level=level, n_boot=n_boot, n_perm=n_perm, seed=seed)
    return {"reference": reference, **{k: v for k, v in c.items() if k != "n"}, "n_problems": c["n"]}


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
              n_boot: int = 10_000, n_perm: int = 10_000, seed: int = 0, by: Sequence[str] | None = None,
              length_bins: int | Sequence[float] | str | None = None, length_by: str = "steps") -> dict:
    """The summary dict of a run (see the module docstring); `records` are results.jsonl lines.

    `by`: per-record fields to break the accuracy down by (the summary's "by" entry, one per field); None:
    those of BREAKDOWNS that the records carry (LiveCodeBench's difficulty and platform).
    `length_bins` (a number of quantile bins, default 3, or ascending edges) and `length_by` ("steps" or
    "tokens") shape the gain-by-chain-length section (`stepscope.evaluate.chain`).
    """
    bins = parse_bins(length_bins)
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
                              f"random sign vectors)",
                   "length_bins": "problems binned by the reference arm's mean thinking length over its samples "
                                  "(quantile or given edges); the other arms' lengths do not enter the bins",
                   "trend": f"Spearman correlation of each problem's paired gain with its reference length; "
                            f"permutation p-value shuffling gains over problems ({n_perm} permutations, "
                            f"two-sided); least-squares slope with a paired bootstrap CI over problems",
                   "cost": "wall time of each generator call, summed per arm; tokens/s = new tokens / that time"},
    }
    out["cost"] = cost_summary(records, arms, reference)
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
    stats = {"level": level, "n_boot": n_boot, "n_perm": n_perm, "seed": seed}
    out["chain_length"] = gain_by_length(records, complete, per_problem, reference, measure=length_by, bins=bins,
                                         **stats)
    out["chain"] = chain_effect(records, complete, arms, reference, **stats)
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
    lines += _chain_length_md(summary.get("chain_length"), list(arms)) + _chain_md(summary.get("chain"))
    return "\n".join(lines + _cost_md(summary.get("cost"))) + "\n"


def _num(x: float | None, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:+,.{digits}f}" if signed else f"{x:,.{digits}f}"


def _diff_cell(c: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """"+d [low, high]" of a paired comparison (scale 100: in points)."""
    if c is None:
        return "n/a"
    return (f"{_num(scale * c['diff'], digits, True)} [{_num(scale * c['ci_low'], digits, True)}, "
            f"{_num(scale * c['ci_high'], digits, True)}]")


def _range(b: dict) -> str:
    lo, hi = b["min_length"], b["max_length"]
    return _num(lo, 1) if lo == hi else f"{_num(lo, 1)}–{_num(hi, 1)}"


def _chain_length_md(sec: dict | None, arms: list[str]) -> list[str]:
    """The gain-by-chain-length section: one row per length bin, then the trend test per arm."""
    lines = ["", "## Gain by chain length", ""]
    if sec is None or not sec.get("available"):
        why = "this summary predates it" if sec is None else sec.get("reason", "")
        return lines + [f"Unavailable: {why}."]
    ref, unit = sec["binned_on"], sec["unit"]
    others = [a for a in arms if a != ref]
    kind = (f"{len(sec['bins'])} quantile bins" if isinstance(sec["bins_spec"], int) else
            "bins at " + ", ".join(_num(e, 1) for e in sec["bins_spec"]))
    lines += [f"Problems binned by the {arm_label(ref)} arm's thinking {unit} (mean over its samples; {kind}). "
              f"Only the {arm_label(ref)} arm decides the bins, so another arm's effect on length cannot move a "
              f"problem between bins." + (f" Note: {sec['note']}." if sec.get("note") else ""), "",
              f"| bin | {arm_label(ref)} {unit} | problems | " + " | ".join(arm_label(a) for a in arms) + " | "
              + " | ".join(f"{arm_label(a)} − {arm_label(ref)} [{round(100 * sec['trend'][a]['level'])}% CI] | p"
                           for a in others) + " |",
              "|---|---|---|" + "---|" * len(arms) + "---|---|" * len(others)]
    for b in sec["bins"]:
        if not b["n_problems"]:
            lines.append(f"| {b['index'] + 1} | (none) | 0 |" + " |" * len(arms) + " | |" * len(others))
            continue
        acc = " | ".join(f"{_pct(b['arms'][a]['accuracy'])} ± {_pct(b['arms'][a]['se'])}" for a in arms)
        diffs = " | ".join(f"{_diff_cell(b['comparisons'][a])} | {_p(b['comparisons'][a]['p_value'])}"
                           for a in others)
        lines.append(f"| {b['index'] + 1} | {_range(b)} | {b['n_problems']} | {acc} | {diffs} |")
    per = f"{sec['slope_per']:,} {unit}"
    for a in others:
        t = sec["trend"][a]
        head = (f"Does {arm_label(a)}'s gain grow with length? Spearman ρ between each problem's gain and its "
                f"{arm_label(ref)} {unit}")
        if t["spearman_rho"] is None:
            lines += ["", f"{head}: undefined, the gain or the length does not vary over the {t['n_problems']} "
                          f"problems."]
            continue
        slope = f"least-squares slope {_num(100 * t['slope'], 1, True)} points per {per}"
        if t["slope_ci_low"] is not None:
            slope += (f" [{round(100 * t['level'])}% CI {_num(100 * t['slope_ci_low'], 1, True)}, "
                      f"{_num(100 * t['slope_ci_high'], 1, True)}]")
        lines += ["", f"{head}: {t['spearman_rho']:+.2f}, p = {_p(t['p_value'])} (permutation test over "
                      f"{t['n_problems']} problems, two-sided); {slope}."]
    return lines


def _mean_cell(v: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if v is None else f"{_num(scale * v['mean'], digits)} ± {_num(scale * v['se'], digits)}"


# the chain section's columns: chain.CHAIN_FIELDS key -> header
CHAIN_COLUMNS = (("thinking_steps", "thinking steps"), ("thinking_tokens", "thinking tokens"),
                 ("closed_share", "closed"), ("budget_forced_share", "budget-forced"),
                 ("unclosed_share", "never closed"))


def _chain_md(sec: dict | None) -> list[str]:
    """What each arm did to the chain: lengths and how the thinking ended, then each arm minus the reference."""
    lines = ["", "## Effect on the chain", ""]
    if sec is None:
        return lines + ["Unavailable: this summary predates it."]
    names = dict(CHAIN_COLUMNS)
    lines += ["| arm | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
    for a, row in sec["arms"].items():
        lines.append(f"| {arm_label(a)} | " + " | ".join(
            _mean_cell(row[k], *((100.0, 1) if k.endswith("share") else (1.0, 1))) for k in names) + " |")
    for a, comp in sec["comparisons"].items():
        lines += ["", f"| {arm_label(a)} − {arm_label(sec['reference'])} (paired over problems, 95% CI) | "
                  + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names),
                  "| difference | " + " | ".join(_diff_cell(comp[k], 100.0 if k.endswith("share") else 1.0)
                                                 for k in names) + " |"]
    return lines + ["", "Shares in %: closed on its own, closed by budget forcing (the thinking budget ran out), "
                        "never closed; n/a: the records do not carry it."]


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _cost_md(sec: dict | None) -> list[str]:
    """What generation cost per arm in this run, and each arm's throughput over the reference's."""
    lines = ["", "## Cost measured in this run", ""]
    if sec is None:
        return lines + ["Unavailable: this summary predates it."]
    lines += ["| arm | generation s | new tokens | tokens/s | s per sample | OEB fired | SMI fired |",
              "|---|---|---|---|---|---|---|"]
    for a, r in sec["arms"].items():
        lines.append(f"| {arm_label(a)} | {_num(r['seconds'], 1)} | {_num(r['new_tokens'], 0)} | "
                     f"{_num(r['tokens_per_second'], 1)} | {_num(r['seconds_per_sample'], 2)} | "
                     f"{_rate(r['oeb_fire_rate'])} | {_rate(r['smi_fire_rate'])} |")
    lines.append("")
    for a, r in sec["arms"].items():  # the other repairs (core/interventions.py)
        for name, n in (r.get("changed_per_sample") or {}).items():
            lines.append(f"{arm_label(a)}: {name} changed {n:.1f} queries per sample.")
    for a, q in sec["ratios"].items():
        ref = arm_label(sec["reference"])
        if q["throughput"] is None:
            lines.append(f"{arm_label(a)} / {ref} throughput: unavailable.")
        else:
            lines.append(f"{arm_label(a)} / {ref} throughput (tokens/s): {q['throughput']:.3f}x; time per sample: "
                         f"{_num(q['time_per_sample'], 3)}x" + ("" if q["comparable"] else " (not comparable)") + ".")
    where = "; ".join(sorted({f"{s.get('device')}, {s.get('engine')}" for s in sec.get("sessions", [])}))
    told = ([f"Measured on {where} ({len(sec.get('sessions', []))} session(s), {sec['machines']} machine(s))."]
            if where else []) + ([sec["note"][0].upper() + sec["note"][1:] + "."] if sec.get("note") else [])
    lines.append(" ".join(told + ["Generation s: wall time of the arm's generator calls (grading excluded); OEB "
                                  "fired: share of eligible (query, head) pairs; SMI fired: share of (thinking "
                                  "token, SMI layer) positions."]))
    return lines


def write_summary(out: str | os.PathLike, **kwargs) -> dict:
    """Summarize a run folder into summary.json, summary.md and summary.html (the same, with the gain-by-length
    figure); returns the summary. `kwargs` go to `summarize`."""
    from ..report.eval_page import write_eval_page

    info, records = load_run(out)
    summary = summarize(records, info, **kwargs)
    text = markdown(summary)
    atomic_write_json(Path(out) / "summary.json", summary)
    atomic_write_text(Path(out) / "summary.md", text)
    write_eval_page(Path(out) / "summary.html", summary, text)
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


def headline_table(summaries: list[dict], arm: str = "stepflow", reference: str = "baseline",
                   labels: list[str] | None = None) -> str:
    """One row per run: the gain of `arm` over `reference` in each chain-length bin (shortest first), the trend
    test, and the throughput ratio the run measured (with its device; "not comparable" where it was resumed on
    another machine). A run without the arm, or without a field, shows n/a."""
    labels = [f"run {i + 1}" for i in range(len(summaries))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(summaries):
        raise StepscopeError(f"{len(labels)} labels for {len(summaries)} summaries")
    lines = [f"| run | model | benchmark | problems | {arm_label(arm)} − {arm_label(reference)} by length bin, "
             f"shortest first | trend ρ (p) | throughput {arm_label(arm)}/{arm_label(reference)} | device |",
             "|---|---|---|---|---|---|---|---|"]
    for s, label in zip(summaries, labels):
        sec, cost = s.get("chain_length") or {}, s.get("cost") or {}
        gains, trend = "n/a", "n/a"
        if sec.get("available") and arm in sec.get("trend", {}):
            gains = " / ".join(_signed(b["comparisons"][arm]["diff"]) if b["n_problems"] else "–" for b in sec["bins"])
            gains += f" (by {sec['unit']})"
            t = sec["trend"][arm]
            trend = "n/a" if t["spearman_rho"] is None else f"{t['spearman_rho']:+.2f} ({_p(t['p_value'])})"
        ratio = (cost.get("ratios") or {}).get(arm) or {}
        tput = "n/a" if ratio.get("throughput") is None else (
            f"{ratio['throughput']:.3f}x" + ("" if ratio.get("comparable") else " (not comparable)"))
        device = "; ".join(sorted({str(x.get("device")) for x in cost.get("sessions", [])})) or "n/a"
        lines.append(f"| {label} | {model_label(s['model'])} | {benchmark_title(s['benchmark'])} | "
                     f"{s['n_problems']} | {gains} | {trend} | {tput} | {device} |")
    return "\n".join(lines) + ("\n\nGain in points per bin of the baseline's thinking length; ρ: Spearman correlation "
                               "of each problem's gain with that length, permutation p over problems; throughput: "
                               "tokens/s as the run measured them.\n")
