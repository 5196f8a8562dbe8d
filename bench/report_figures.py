"""`stepscope report --figures` on N copies of saliency result folders: PNG (the default) against PNG + SVG, one
process and several, side by side in one run; wall seconds per configuration (median over rounds) and ratios.

    python bench/report_figures.py DIR... --copies 18      # DIR: result folders (e.g. a demo's saliency/*)

The figures' time is what the command prints when its last figure is done; the rest of the command (loading,
diagnosing, the HTML page) is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def run_once(dirs: list[str], figures: Path, formats: str, jobs: int) -> tuple[float, float]:
    """(seconds until the last figure, seconds of the whole command)."""
    from stepscope.cli import main

    shutil.rmtree(figures, ignore_errors=True)
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main(["report", *dirs, "--out", str(figures.parent / "r.html"), "--figures", str(figures),
                   "--figure-format", formats, "--jobs", str(jobs)])
    total = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"stepscope report exited {rc}")
    last = [float(m.group(1)) for m in re.finditer(r"figures \d+/\d+: .* \(([\d.]+) s\)", out.getvalue())]
    return last[-1], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="saliency result folders")
    ap.add_argument("--copies", type=int, default=18, help="results in the report (the folders repeated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", default="1,2", help="process counts to compare")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sal = Path(tmp) / "sal"
        dirs = []
        for k in range(args.copies):
            src = Path(args.dirs[k % len(args.dirs)])
            dst = sal / f"{src.name}-{k}"
            shutil.copytree(src, dst)
            dirs.append(str(dst))
        configs = [(f, int(j)) for j in args.jobs.split(",") for f in ("png", "png,svg")]
        times: dict = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:  # configurations alternate within each round
                times[c].append(run_once(dirs, Path(tmp) / "figs", *c))
        print(f"{args.copies} results, {args.rounds} rounds (median)")
        print(f"{'formats':<10}{'jobs':>5}{'figures s':>11}{'command s':>11}{'vs png,svg':>12}")
        for f, j in configs:
            fig = statistics.median(t[0] for t in times[(f, j)])
            cmd = statistics.median(t[1] for t in times[(f, j)])
            ref = statistics.median(t[0] for t in times[("png,svg", j)])
            print(f"{f:<10}{j:>5}{fig:>11.2f}{cmd:>11.2f}{fig / ref:>11.2f}x")


if __name__ == "__main__":
    main()
