"""Compare correct and wrong traces layer by layer (docs/method.md §4 metrics).

For every metric and layer: each group's mean with a 95% bootstrap interval, the difference (wrong - correct)
with its interval, Welch's t-test (Hedges' g) and the Mann-Whitney U test (rank-biserial r). The unit is the
problem (meta problem_id, else the problem text): a group's traces of one problem (samples, arms) are averaged
first, so the tests resample problems, not traces. Problems present in both groups also get paired tests.
p-values are given raw and adjusted across layers (Holm; Benjamini-Hochberg). Warnings (on stderr and in
summary.txt) say when a group has few problems or one problem holds most of it, and when no problem is in both
groups. --arm keeps the traces of one arm of `stepscope eval --save-traces`. Writes comparison.json,
summary.txt and figures (metrics_by_layer, scores; PNG and SVG) into --out, atomically.

examples:
  stepscope compare --correct sal/ok-* --wrong sal/bad-* --out cmp/
  stepscope compare --by-meta sal/ --out cmp/          # split by each trace's meta "correct"
  stepscope compare --by-meta sal/ --arm stepflow --out cmp/   # only the StepFlow arm of an eval run
"""

from __future__ import annotations

import argparse

HELP = "correct versus wrong traces: per-layer means, intervals, tests, effect sizes, figures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--correct", nargs="+", default=[], metavar="DIR", help="results of correct traces")
    p.add_argument("--wrong", nargs="+", default=[], metavar="DIR", help="results of wrong traces")
    p.add_argument("--by-meta", nargs="+", default=[], metavar="DIR",
                   help="results split into the groups by their trace's meta 'correct' (true/false)")
    p.add_argument("--arm", default=None, metavar="ARM",
                   help="only traces of this arm (their meta 'arm', as eval --save-traces writes it: baseline, "
                        "stepflow, oeb, smi); without it, traces of several arms are pooled per problem")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--n-perm", type=int, default=10_000, help="paired permutations (default 10000; exact up to "
                                                               "16 pairs, or when 2^pairs is smaller)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="marks layers with Holm-adjusted p < alpha")
    p.add_argument("--no-figures", action="store_true", help="JSON and text only")


def _pick_arm(groups: dict[str, list], arm: str | None) -> None:
    """Keep the traces of `arm` in every group (in place); with no arm, warn when several arms are pooled."""
    import sys

    from ..errors import StepscopeError

    arms = sorted({str(d.meta["arm"]) for g in groups.values() for d in g if d.meta.get("arm") is not None})
    if arm is None:
        if len(arms) > 1:
            print(f"stepscope compare: note: the traces are of {len(arms)} arms ({', '.join(arms)}), pooled per "
                  "problem; --arm NAME compares one of them", file=sys.stderr)
        return
    if arm not in arms:
        raise StepscopeError(f"--arm {arm}: no trace of that arm (their meta names "
                             + (f"the arms {', '.join(arms)})" if arms else "no arm)"))
    for name in groups:
        groups[name][:] = [d for d in groups[name] if d.meta.get("arm") == arm]


def run(args: argparse.Namespace) -> int:
    import sys

    from ..diagnose import compare, diagnose
    from ..errors import StepscopeError
    from ..io import atomic_dir, check_writable
    from ..saliency.result import find_results

    check_writable(args.out, "--out", folder=True)
    correct = [diagnose(p) for p in find_results(args.correct)] if args.correct else []
    wrong = [diagnose(p) for p in find_results(args.wrong)] if args.wrong else []
    if args.by_meta:
        for p in find_results(args.by_meta):
            d = diagnose(p)
            label = d.meta.get("correct")
            if not isinstance(label, bool):
                raise StepscopeError(f"{p}: its trace's meta has no true/false 'correct' (got {label!r}); "
                                     "use --correct/--wrong")
            (correct if label else wrong).append(d)
    _pick_arm({"correct": correct, "wrong": wrong}, args.arm)
    if not correct or not wrong:
        raise StepscopeError(f"need traces in both groups (correct: {len(correct)}, wrong: {len(wrong)}"
                             + (f", of arm {args.arm}" if args.arm else "") + "); give --correct and --wrong, "
                             "or --by-meta")
    if args.n_boot < 1 or args.n_perm < 1 or not 0 < args.level < 1:
        raise StepscopeError("--n-boot and --n-perm must be positive, --level in (0, 1)")
    cmp = compare(correct, wrong, n_boot=args.n_boot, n_perm=args.n_perm, level=args.level, seed=args.seed)
    table = cmp.table(alpha=args.alpha)
    for w in cmp.warnings or []:
        print(f"stepscope compare: warning: {w}", file=sys.stderr)
    with atomic_dir(args.out) as tmp:
        import json

        (tmp / "comparison.json").write_text(json.dumps(cmp.to_json(), indent=1, allow_nan=False) + "\n",
                                             encoding="utf-8")
        (tmp / "summary.txt").write_text(table + "\n\n" + cmp.to_json()["multiple_comparisons"] + "\n",
                                         encoding="utf-8")
        if not args.no_figures:
            from ..report.figures import metric_depth_figure, save_figure, scores_figure

            save_figure(metric_depth_figure(cmp, alpha=args.alpha), tmp / "metrics_by_layer")
            save_figure(scores_figure(cmp), tmp / "scores")
    print(table)
    print(f"wrote {args.out}/comparison.json, summary.txt" + ("" if args.no_figures else
          ", metrics_by_layer.png/.svg, scores.png/.svg"))
    return 0
