"""Code-grading throughput: small programs graded per second per core in each sandbox mode, and what dominates.

usage: python bench/code_grading.py [--programs 120] [--tests 3] [--workers N] [--modes bwrap,setsid]

Each program is a correct A+B solution with `--tests` stdin/stdout tests, graded by grade_code_many on
`--workers` threads (default: the CPU count), each program in its own sandbox. The breakdown times, one
program at a time, the parts of one grading: a bare `python -I -S` start, bwrap's own cost (`bwrap ... true`),
the sandbox start up to the launcher's "ready", one test (a forked child), and the clean-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from stepscope.evaluate.code_grading import grade_code_many
from stepscope.evaluate.sandbox import Limits, SandboxedProgram, _bwrap_args, _env, _interpreter, resolve_mode

CODE = "a, b = map(int, input().split())\nprint(a + b)\n"


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def breakdown(mode: str, reps: int) -> dict[str, float]:
    python, prefix = _interpreter()
    out = {"python -I -S start": median_ms(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
                                           reps)}
    if mode == "bwrap":
        cmd = _bwrap_args(python, prefix, Limits(), _env("/tmp", None)) + ["/bin/true"]
        out["bwrap alone (true)"] = median_ms(lambda: subprocess.run(cmd, check=True), reps)
    starts, tests, closes = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        prog = SandboxedProgram(CODE, mode=mode)
        t1 = time.perf_counter()
        r = prog.run("1 2\n")
        t2 = time.perf_counter()
        prog.close()
        t3 = time.perf_counter()
        assert r is not None and r.out == "3\n", r
        starts.append(t1 - t0)
        tests.append(t2 - t1)
        closes.append(t3 - t2)
    out["sandbox start to ready"] = 1000 * statistics.median(starts)
    out["one test (fork, run, report)"] = 1000 * statistics.median(tests)
    out["close (kill, reap, clean up)"] = 1000 * statistics.median(closes)
    return out


def throughput(mode: str, programs: int, n_tests: int, workers: int) -> float:
    tests = [(f"{i} {i + 1}\n", f"{2 * i + 1}\n") for i in range(n_tests)]
    jobs = [{"tests": tests, "response": f"</think>\n```python\n{CODE}```\n"} for _ in range(programs)]
    t = time.perf_counter()
    grades = grade_code_many(jobs, workers=workers, mode=mode)
    dt = time.perf_counter() - t
    assert all(g.correct for g in grades), [g.status for g in grades if not g.correct][:3]
    return programs / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=120)
    ap.add_argument("--tests", type=int, default=3, help="tests per program (default 3)")
    ap.add_argument("--workers", type=int, default=None, help="default: the CPU count")
    ap.add_argument("--modes", default="bwrap,setsid")
    ap.add_argument("--reps", type=int, default=15, help="repetitions of each breakdown timing (median)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    load = os.getloadavg()[0]
    print(f"# code grading: {args.programs} programs x {args.tests} tests, {workers} workers, {cores} cores, "
          f"load {load:.2f}, python {sys.version.split()[0]}, sandbox python {_interpreter()[0]}, "
          f"root {os.geteuid() == 0}")
    goals = {"bwrap": 10.0, "setsid": 20.0}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if resolve_mode(mode) != mode:
            print(f"{mode}: not available here")
            continue
        parts = breakdown(mode, args.reps)
        rate = throughput(mode, args.programs, args.tests, workers)
        per_core = rate / min(workers, cores)
        print(f"\n## {mode}: {rate:.1f} programs/s, {per_core:.1f} per core (goal {goals[mode]:.0f}); "
              f"{'met' if per_core >= goals[mode] else 'NOT met'}")
        print("| part (one program at a time, median) | ms |\n|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.1f} |")
        top = max((k for k in parts if k != "python -I -S start"), key=parts.get)
        print(f"dominant: {top} ({parts[top]:.1f} ms, of which the bare interpreter start is "
              f"{parts['python -I -S start']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
