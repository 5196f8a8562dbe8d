"""Code-grading throughput: small programs graded per second per core in each sandbox mode, and what dominates.

usage: python bench/code_grading.py [--programs 120] [--tests 3] [--workers N] [--modes bwrap,setsid]
                                    [--rounds 3] [--json out.json] [--baseline-src OTHER/src]

Each program is a correct A+B solution with `--tests` stdin/stdout tests, graded by grade_code_many on
`--workers` threads (default: the CPU count). Two ways side by side, interleaved over `--rounds` rounds (the
median is reported): `server`, each program a fresh fork of a sandbox server that already imported
LiveCodeBench's header (the default), and `fresh`, a new sandbox (bwrap or subprocess, interpreter, imports)
per program (`reuse=False`). The breakdown times, one program at a time, the parts of one grading: a bare
`python -I -S` start, bwrap's own cost (`bwrap ... true`), a server's start, a program's start on a warm
server and in a fresh sandbox, the first test (the runner's start included), a further test and the end of a
program (clean-up). Besides the wall-clock rate it reports the CPU time per program of the grader and all
sandbox processes together, which a shared machine's load does not inflate (not for bwrap's fresh way:
bubblewrap does not hand its children's CPU time up, and a fresh sandbox is gone before it can be read).

`--baseline-src OTHER/src` (another checkout's src folder, e.g. `git archive main src | tar -x -C /tmp/base`)
adds the before/after comparison: in each round, served throughput of this tree and of that one, each in a
process of its own importing its tree, the order alternating; it reports both medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stepscope.cpus import usable_cpus
from stepscope.evaluate.code_grading import grade_code_many
from stepscope.evaluate.sandbox import SandboxedProgram, close_servers, resolve_mode
from stepscope.evaluate.sandbox_server import SandboxServer, bwrap_args, interpreter, sandbox_env

CODE = "a, b = map(int, input().split())\nprint(a + b)\n"
GOALS = {"bwrap": 10.0, "setsid": 20.0}


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def one_program(mode: str, reuse: bool) -> tuple[float, float, float, float]:
    """(start, first test, second test, close) seconds of one program."""
    t0 = time.perf_counter()
    prog = SandboxedProgram(CODE, mode=mode, reuse=reuse)
    t1 = time.perf_counter()
    r = prog.run("1 2\n")
    t2 = time.perf_counter()
    r2 = prog.run("2 3\n")
    t3 = time.perf_counter()
    prog.close()
    t4 = time.perf_counter()
    assert r is not None and r.out == "3\n" and r2 is not None and r2.out == "5\n", (r, r2)
    return t1 - t0, t2 - t1, t3 - t2, t4 - t3


def breakdown(mode: str, reps: int) -> dict[str, float]:
    python, prefix = interpreter()
    out = {"python -I -S start": median_ms(lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
                                           reps)}
    if mode == "bwrap":
        cmd = bwrap_args(python, prefix, 64, sandbox_env("/tmp", None)) + ["/bin/true"]
        out["bwrap alone (true)"] = median_ms(lambda: subprocess.run(cmd, check=True), reps)
    out["server start (to its hello)"] = median_ms(lambda: SandboxServer(mode, 64).kill(), reps)
    close_servers()
    one_program(mode, True)  # a warm server
    warm = [one_program(mode, True) for _ in range(reps)]
    fresh = [one_program(mode, False) for _ in range(reps)]
    out["program start, warm server (fork, compile)"] = 1000 * statistics.median(w[0] for w in warm)
    out["program start, fresh sandbox"] = 1000 * statistics.median(f[0] for f in fresh)
    out["first test (runner start, run, report)"] = 1000 * statistics.median(w[1] for w in warm)
    out["a further test (run, report)"] = 1000 * statistics.median(w[2] for w in warm)
    out["program end, warm server (clean-up)"] = 1000 * statistics.median(w[3] for w in warm)
    out["program end, fresh sandbox (kill, reap)"] = 1000 * statistics.median(f[3] for f in fresh)
    return out


def cpu_seconds() -> float:
    """CPU time of this process, of every reaped descendant (setsid servers and what they reaped) and of every
    live one (read from /proc: bubblewrap never hands its children's CPU time up, so a bwrap server's is read
    while it lives)."""
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            stats[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))  # parent; u, s, cu, cs time
    live, frontier = 0, {os.getpid()}
    while frontier:
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier}
        live += sum(stats[pid][1] for pid in frontier)
    return own + live / os.sysconf("SC_CLK_TCK")


def throughput(mode: str, programs: int, n_tests: int, workers: int, reuse: bool) -> tuple[float, float]:
    """(programs per second, CPU milliseconds per program: grader and sandboxes, servers' starts included)."""
    tests = [(f"{i} {i + 1}\n", f"{2 * i + 1}\n") for i in range(n_tests)]
    jobs = [{"tests": tests, "response": f"</think>\n```python\n{CODE}```\n"} for _ in range(programs)]
    close_servers()  # each measurement starts its servers itself
    c, t = cpu_seconds(), time.perf_counter()
    grades = grade_code_many(jobs, workers=workers, mode=mode, reuse=reuse)
    dt = time.perf_counter() - t
    cpu = cpu_seconds() - c  # the servers still live: their CPU time is read from /proc
    assert all(g.correct for g in grades), [g.status for g in grades if not g.correct][:3]
    return programs / dt, 1000 * cpu / programs


def compare_trees(baseline_src: str, mode: str, args, workers: int) -> dict:
    """Served throughput of this tree and of `baseline_src`, interleaved over args.rounds rounds, each
    measurement in a fresh process importing its own tree: the medians, per core, and ours / baseline."""
    trees = {"ours": str(Path(__file__).resolve().parents[1] / "src"), "baseline": str(Path(baseline_src).resolve())}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            cmd = [sys.executable, __file__, "--_child", mode, "--programs", str(args.programs), "--tests",
                   str(args.tests), "--workers", str(workers)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=trees[name]))
            if p.returncode:
                sys.exit(f"{name} ({mode}) failed:\n{p.stderr[-3000:]}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            if Path(runs[name][-1]["src"]).resolve() != Path(trees[name]):
                sys.exit(f"{name} imported stepscope from {runs[name][-1]['src']}, not {trees[name]}")
            print(f"{mode} round {r + 1} {name:>8}: {runs[name][-1]['rate']:.1f} programs/s, "
                  f"{runs[name][-1]['cpu_ms']:.1f} ms CPU per program", flush=True)
    cores = min(workers, usable_cpus())
    out = {name: {"programs_per_s": statistics.median(x["rate"] for x in rs),
                  "per_core": statistics.median(x["rate"] for x in rs) / cores,
                  "cpu_ms_per_program": statistics.median(x["cpu_ms"] for x in rs),
                  "rounds": [x["rate"] for x in rs], "commit": _commit(trees[name])} for name, rs in runs.items()}
    out["ratio"] = out["ours"]["programs_per_s"] / out["baseline"]["programs_per_s"]
    out["cpu_ratio"] = out["ours"]["cpu_ms_per_program"] / out["baseline"]["cpu_ms_per_program"]
    print(f"\n## {mode}, served, ours against {trees['baseline']}: {out['ours']['per_core']:.1f} vs "
          f"{out['baseline']['per_core']:.1f} programs/s per core, {out['ratio']:.2f}x (median of {args.rounds} "
          f"rounds); CPU per program {out['ours']['cpu_ms_per_program']:.1f} vs "
          f"{out['baseline']['cpu_ms_per_program']:.1f} ms ({out['cpu_ratio']:.2f}x)")
    return out


def _commit(src: str) -> str:
    g = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return (g.stdout.strip() or "?") + (" + uncommitted changes" if g.returncode == 0 and dirty.stdout.strip() else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=120)
    ap.add_argument("--tests", type=int, default=3, help="tests per program (default 3)")
    ap.add_argument("--workers", type=int, default=None, help="default: the CPU count")
    ap.add_argument("--modes", default="bwrap,setsid")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each throughput (median)")
    ap.add_argument("--reps", type=int, default=15, help="repetitions of each breakdown timing (median)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--baseline-src", default=None, help="another checkout's src folder to compare with")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:  # one served throughput measurement of the tree on PYTHONPATH
        import stepscope

        rate, cpu = throughput(args._child, args.programs, args.tests, args.workers or usable_cpus(), reuse=True)
        close_servers()
        print(json.dumps({"rate": rate, "cpu_ms": cpu, "src": str(Path(stepscope.__file__).parents[1])}))
        return 0
    cores = usable_cpus()
    workers = args.workers or cores
    loads = [os.getloadavg()[0]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# code grading: {args.programs} programs x {args.tests} tests, {workers} workers, {cores} cores, "
          f"load {loads[0]:.2f}, python {sys.version.split()[0]}, sandbox python {interpreter()[0]}, "
          f"root {os.geteuid() == 0}, commit {commit or '?'}")
    result = {"programs": args.programs, "tests": args.tests, "workers": workers, "cores": cores, "commit": commit,
              "root": os.geteuid() == 0, "modes": {}}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if resolve_mode(mode) != mode:
            print(f"{mode}: not available here")
            continue
        if args.baseline_src:
            result["modes"][mode] = {"before_after": compare_trees(args.baseline_src, mode, args, workers)}
            loads.append(os.getloadavg()[0])
            continue
        parts = breakdown(mode, args.reps)
        rates: dict[str, list[float]] = {"server": [], "fresh": []}
        cpus: dict[str, list[float]] = {"server": [], "fresh": []}
        for _ in range(args.rounds):
            for way in rates:
                r, c = throughput(mode, args.programs, args.tests, workers, reuse=way == "server")
                rates[way].append(r)
                cpus[way].append(c)
            loads.append(os.getloadavg()[0])
        rate = {way: statistics.median(r) for way, r in rates.items()}
        cpu = {way: statistics.median(c) for way, c in cpus.items()}
        per_core = {way: r / min(workers, cores) for way, r in rate.items()}
        goal = GOALS[mode]
        print(f"\n## {mode}: server {rate['server']:.1f} programs/s, {per_core['server']:.1f} per core (goal "
              f"{goal:.0f}: {'met' if per_core['server'] >= goal else 'NOT met'}); fresh sandbox per program "
              f"{rate['fresh']:.1f}/s, {per_core['fresh']:.1f} per core; server / fresh "
              f"{rate['server'] / rate['fresh']:.2f}x (median of {args.rounds} rounds; each round: server "
              f"{', '.join(f'{r:.1f}' for r in rates['server'])}; fresh {', '.join(f'{r:.1f}' for r in rates['fresh'])})")
        if mode == "bwrap":  # a fresh sandbox ends before its CPU time can be read, and bwrap does not hand it up
            cpu["fresh"] = None
        fresh_cpu = (f"fresh {cpu['fresh']:.1f} ms ({1000 / cpu['fresh']:.1f} per CPU-second)" if cpu["fresh"]
                     else "fresh: not measurable (bubblewrap does not hand its children's CPU time up)")
        print(f"CPU time per program (grader and sandboxes): server {cpu['server']:.1f} ms "
              f"({1000 / cpu['server']:.1f} programs per CPU-second), {fresh_cpu}")
        print("| part (one program at a time, median) | ms |\n|---|---|")
        for k, v in parts.items():
            print(f"| {k} | {v:.1f} |")
        per_program = {"start": parts["program start, warm server (fork, compile)"],
                       f"{args.tests} tests": parts["first test (runner start, run, report)"]
                       + (args.tests - 1) * parts["a further test (run, report)"],
                       "end": parts["program end, warm server (clean-up)"]}
        top = max(per_program, key=per_program.get)
        print(f"dominant with the server: {top} ({per_program[top]:.1f} ms of "
              f"{sum(per_program.values()):.1f} ms per program); in a fresh sandbox the start "
              f"({parts['program start, fresh sandbox']:.1f} ms, of which the bare interpreter start is "
              f"{parts['python -I -S start']:.1f} ms)")
        result["modes"][mode] = {"programs_per_s": rate, "per_core": per_core, "rounds": rates, "goal": goal,
                                 "cpu_ms_per_program": cpu, "cpu_rounds": cpus, "parts_ms": parts}
    close_servers()
    result["load"] = {"start": loads[0], "max": max(loads), "median": statistics.median(loads)}
    print(f"\nload average (1 min): {loads[0]:.2f} at the start, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f} over the rounds")
    if args.json:
        from stepscope.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
