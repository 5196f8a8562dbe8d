"""Diagnose saliency results: Shallow Lock-in and Deep Decay metrics per layer (docs/method.md §4).

Each DIR is a saliency result folder (maps.safetensors, trace.json, meta.json, as `stepscope saliency`
writes it) or a folder of them. For each result this prints a per-layer table and writes diagnosis.json into
its folder. A single trace gets a verdict only against a baseline profile (for example built from the same
model's correct traces with --save-profile); without one you get the numbers.

examples:
  stepscope diagnose sal/ok-1 sal/ok-2 sal/ok-3 --save-profile correct_profile.json
  stepscope diagnose sal/suspect --baseline correct_profile.json
"""

from __future__ import annotations

import argparse
import sys

HELP = "lock-in and decay metrics per layer of saliency results; verdicts against a baseline profile"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="saliency result folder(s), or folder(s) of them")
    p.add_argument("--baseline", metavar="PROFILE.json", help="baseline profile: adds z-scores, flags, verdicts")
    p.add_argument("--save-profile", metavar="OUT.json",
                   help="build a baseline profile (per-layer mean and sd) from these results and save it")
    p.add_argument("--z", type=float, default=2.0, help="flag threshold |z| in the bad direction (default 2)")
    p.add_argument("--summary-only", action="store_true", help="one line per result, no per-layer tables")
    p.add_argument("--no-write", action="store_true", help="do not write diagnosis.json into the folders")


def run(args: argparse.Namespace) -> int:
    from ..diagnose import Profile, apply_baseline, build_profile, diagnose, format_scores
    from ..errors import StepscopeError
    from ..io import check_writable
    from ..saliency.result import find_results

    if args.z <= 0:
        raise StepscopeError("--z must be positive")
    if args.save_profile:
        check_writable(args.save_profile, "--save-profile")
    dirs = find_results(args.dirs)
    if not args.no_write:
        for d in dirs:
            check_writable(d / "diagnosis.json", "")  # or --no-write
    baseline = Profile.load(args.baseline) if args.baseline else None
    diagnoses = [diagnose(d) for d in dirs]  # everything is computed before anything is written
    plain = [type(d).from_json(d.to_json()) for d in diagnoses]  # copies without baseline fields, for a profile
    if baseline is not None:
        for d in diagnoses:
            apply_baseline(d, baseline, threshold=args.z)
    for path, d in zip(dirs, diagnoses):
        if not args.summary_only:
            print(f"== {path}  ({d.id or 'no id'}; {d.step_counts['question']} question, "
                  f"{d.step_counts['thinking']} thinking, {d.step_counts['summary']} summary steps)")
            print(d.table())
            print()
        if not args.no_write:
            d.save(path / "diagnosis.json")
    print(_summary(dirs, diagnoses, format_scores))
    if args.save_profile:
        profile = build_profile(plain)
        profile.save(args.save_profile)
        labels = [d.meta.get("correct") for d in diagnoses]
        n_ok, n_bad = labels.count(True), labels.count(False)
        print(f"saved a baseline profile of {len(plain)} traces to {args.save_profile} "
              f"({n_ok} marked correct, {n_bad} marked wrong, {len(labels) - n_ok - n_bad} unmarked)",
              file=sys.stderr)
        if n_bad:
            print("note: a baseline is meant to describe normal traces; wrong ones blur it", file=sys.stderr)
        if len(plain) < 10:
            print(f"note: {len(plain)} traces make a noisy baseline (z-scores need a good sd); 20+ is better",
                  file=sys.stderr)
    return 0


def _summary(dirs, diagnoses, format_scores) -> str:
    width = max(len(str(p)) for p in dirs)
    lines = [f"{'result':<{width}}  correct  steps(q/t/s)  scores; verdict"]
    for p, d in zip(dirs, diagnoses):
        c = d.meta.get("correct")
        c = "-" if c is None else ("yes" if c else "no")
        steps = f"{d.step_counts['question']}/{d.step_counts['thinking']}/{d.step_counts['summary']}"
        lines.append(f"{str(p):<{width}}  {c:<7}  {steps:<12}  {format_scores(d)}")
    return "\n".join(lines)
