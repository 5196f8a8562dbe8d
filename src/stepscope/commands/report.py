"""Write one self-contained HTML report of saliency results.

The page needs no network: the trace text coloured by step, each layer's step map drawn from embedded data
(layer slider; hover a cell to read both steps), a metric-by-layer chart, the metrics table and, with
--baseline, z-scores, flags and verdicts. Several results get a selector. Model text is always shown as text.
--figures DIR also writes per-result figures (a grid of layers, metrics by layer): PNG, or SVG too with
--figure-format png,svg; several results at once (--jobs), with a line per finished result.

examples:
  stepscope report sal/ --out report.html
  stepscope report sal/suspect --baseline correct_profile.json --out suspect.html --figures figs/
  stepscope report sal/ --out report.html --figures figs/ --figure-format png,svg
  stepscope report sal/ --out report.html --calibration stepflow.json
"""

from __future__ import annotations

import argparse
import re

from ..wording import plural

HELP = "one self-contained HTML report (heatmaps, layer slider, trace text, metrics, verdicts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="saliency result folder(s), or folder(s) of them")
    p.add_argument("--out", required=True, metavar="FILE.html", help="the report file")
    p.add_argument("--baseline", metavar="PROFILE.json", help="baseline profile for z-scores and verdicts")
    p.add_argument("--title", default="stepscope report", help="page title")
    p.add_argument("--calibration", metavar="FILE.json",
                   help="add the StepFlow calibration (the config `stepscope calibrate` wrote, or its "
                        ".calibration.json): per-layer evidence with the chosen bands beside the defaults")
    p.add_argument("--layers", default=None,
                   help="embed only these map positions, e.g. 0,1,2,27-29 (default: all, or an even spread "
                        "when the maps would exceed --max-mb)")
    p.add_argument("--max-mb", type=float, default=40.0, help="size budget of the embedded maps (default 40)")
    p.add_argument("--figures", metavar="DIR", help="also write figures per result into DIR")
    p.add_argument("--figure-format", default="png", metavar="FMT",
                   help="formats of --figures, comma-separated: png, svg (default png; SVG takes about half as "
                        "long again)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes drawing --figures at once (default: one per CPU, at most 8; 1: this process)")


def _parse_positions(spec: str) -> list[int]:
    from ..errors import StepscopeError

    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise StepscopeError(f"--layers: cannot read {part!r} (use 3, 0-7 or 0,5,10-12)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        out.update(range(min(a, b), max(a, b) + 1))
    return sorted(out)


def run(args: argparse.Namespace) -> int:
    from ..cpus import usable_cpus
    from ..diagnose import Profile, diagnose
    from ..errors import StepscopeError
    from ..io import check_writable
    from ..report.html import render_report
    from ..saliency.result import find_results, load_result

    if not args.out.lower().endswith((".html", ".htm")):
        raise StepscopeError(f"--out {args.out}: expected a .html file name")
    if args.max_mb <= 0:
        raise StepscopeError("--max-mb must be positive")
    if args.jobs is not None and args.jobs < 1:
        raise StepscopeError(f"--jobs must be at least 1, got {args.jobs}")
    formats = _figure_formats(args.figure_format)
    check_writable(args.out, "--out")
    if args.figures:
        check_writable(args.figures, "--figures", folder=True)
    sections = []
    if args.calibration:
        from ..calibration import load_calibration
        from ..report.calibration import calibration_section

        sections.append(("StepFlow calibration", calibration_section(load_calibration(args.calibration))))
    dirs = find_results(args.dirs)
    baseline = Profile.load(args.baseline) if args.baseline else None
    results = [load_result(d) for d in dirs]
    diagnoses = [diagnose(r, baseline=baseline) for r in results]
    layers = _parse_positions(args.layers) if args.layers else None
    labels = []
    for d, r in zip(dirs, results):
        rid = getattr(r.trace, "meta", {}).get("id")
        labels.append(str(rid) if rid is not None else d.name)
    if args.figures:
        _figures(args.figures, results, diagnoses, labels, args.jobs or min(8, usable_cpus()), formats)
    out = render_report(results, args.out, diagnoses=diagnoses, baseline=baseline, title=args.title,
                        labels=labels, layers=layers, max_map_bytes=int(args.max_mb * 1e6), extra_sections=sections)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB, {len(results)} result{'s' if len(results) != 1 else ''})"
          + (f" and figures in {args.figures}" if args.figures else ""))
    return 0


def _figure_formats(spec: str) -> tuple[str, ...]:
    from ..errors import StepscopeError
    from ..report.figures import FIGURE_FORMATS

    formats = tuple(dict.fromkeys(f.strip().lower() for f in spec.split(",") if f.strip()))
    bad = [f for f in formats if f not in FIGURE_FORMATS]
    if bad or not formats:
        raise StepscopeError(f"--figure-format {spec!r}: use {', '.join(FIGURE_FORMATS)} or both, comma-separated")
    return formats


def _figures(folder: str, results, diagnoses, labels, jobs: int, formats: tuple[str, ...]) -> None:
    """Every result's figures (stepscope.report.figures.result_figures) into `folder`, atomically; with `jobs` > 1
    in that many worker processes. A line per finished result."""
    import time

    from ..io import atomic_dir
    from ..report.figures import result_figures

    used: set[str] = set()
    tasks = []  # (file name stem, result_figures' other arguments)
    for k, (r, d, label) in enumerate(zip(results, diagnoses, labels)):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:80] or f"result_{k}"
        if name in used:
            name = f"{name}_{k}"
        used.add(name)
        # maps: [L, S, S] float32 of a SaliencyResult read from its folder
        tasks.append((name, (r.maps.float().numpy(), [s.kind for s in r.trace.steps], d, label, formats)))
    jobs = min(jobs, len(tasks))
    print(f"figures of {plural(len(tasks), 'result')} -> {folder}" + (f" ({jobs} processes)" if jobs > 1 else ""),
          flush=True)
    start = time.perf_counter()
    with atomic_dir(folder) as tmp:
        def finished(k: int, name: str) -> None:
            print(f"figures {k}/{len(tasks)}: {name} ({time.perf_counter() - start:.1f} s)", flush=True)

        if jobs == 1:
            for k, (name, rest) in enumerate(tasks, 1):
                result_figures(tmp / name, *rest)
                finished(k, name)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: the workers start clean (no copy of this process's threads), as on every platform
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(result_figures, tmp / name, *rest): name for name, rest in tasks}
            for k, f in enumerate(as_completed(futures), 1):
                f.result()
                finished(k, futures[f])
