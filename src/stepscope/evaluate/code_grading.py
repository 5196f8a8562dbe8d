"""Grading of model-written code: the program is the summary's last Python block, run on tests in a sandbox.

Comparison as LiveCodeBench does it (lcb_runner/evaluation/testing_util.py; stepscope.evaluate.outputs):
- stdin/stdout tests: both outputs stripped, split into lines, each line stripped; the line counts must agree,
  and each pair of lines is equal as text or, failing that, as lists of decimal numbers (`Decimal`, so
  `1.50` equals `1.5` and `50000000000000000` differs from `50000000000000001`).
- call-based tests: the input holds one JSON value per line, the arguments of `Solution().<fn_name>(...)`;
  the returned value (a top-level tuple taken as a list) must `==` the JSON-decoded expected output.
All of a program's tests run in one process (the module set up once), in order, stopping at the first failure,
like LiveCodeBench; the verdict is decided here, outside the sandbox, on the whole output as it arrives: the
expected outputs never enter the sandbox, and no output or value makes grading raise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..cpus import usable_cpus
from ..errors import StepscopeError
from .grading import THINK_END, Grade, summary_of
from .outputs import StdoutComparison, ValueComparison, cut
from .sandbox import Limits, SandboxedProgram

STATUSES = ("passed", "wrong_answer", "timeout", "runtime_error", "memory_limit", "no_code")
PYTHON_TAGS = ("", "python", "py", "python3")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class CodeTest:
    """One test: the input (stdin text, or one JSON argument per line) and the expected output."""

    input: str
    output: str

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output}


def as_tests(tests: Iterable) -> list[CodeTest]:
    """CodeTests from CodeTests, (input, output) pairs or {"input", "output"} dicts."""
    out = []
    for i, t in enumerate(tests):
        if isinstance(t, CodeTest):
            out.append(t)
        elif isinstance(t, dict) and isinstance(t.get("input"), str) and isinstance(t.get("output"), str):
            out.append(CodeTest(t["input"], t["output"]))
        elif isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, str) for x in t):
            out.append(CodeTest(t[0], t[1]))
        else:
            raise StepscopeError(f"test {i} is not an (input, output) pair of strings")
    if not out:
        raise StepscopeError("a code problem needs at least one test")
    return out


# ------------------------------------------------------------------------------------------- extraction

def extract_code(summary: str) -> str | None:
    """The last fenced block of `summary` tagged as Python (```python, ```py, ```python3), or, when there is
    none, the last bare ``` block; None when neither holds code. (A bare block after the program is usually
    its sample output; docs/livecodebench.md compares this with LiveCodeBench's rule.)"""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(summary)
              if m.group(1).lower() in PYTHON_TAGS and m.group(2).strip()]
    tagged = [code for tag, code in blocks if tag]
    bare = [code for tag, code in blocks if not tag]
    return (tagged or bare or [None])[-1]


# ------------------------------------------------------------------------------------------- comparison

def stdio_equal(got: str, expected: str) -> bool:
    """LiveCodeBench's stdout comparison (stepscope.evaluate.outputs): per stripped line, equal as text or as
    lists of decimals; never raises."""
    c = StdoutComparison(expected)
    c.feed(got)
    return c.result()


def call_equal(value_json: str, expected: str) -> bool:
    """A returned value's JSON against the JSON expected output, as Python's == compares them; never raises."""
    c = ValueComparison(expected)
    c.feed("v" + value_json)
    return c.result()


# ---------------------------------------------------------------------------------------------- grading

def run_tests(code: str, tests: Sequence[CodeTest], *, fn_name: str | None = None, limits: Limits | None = None,
              mode: str = "auto", reuse: bool = True) -> tuple[str, list[str], dict | None]:
    """Run `code` on `tests` in one sandbox, in order, up to the first failure (`reuse`: SandboxedProgram's).

    Each output is compared as it arrives, whole (no cap below the sandbox's file-size limit). Returns (overall
    status, each run test's status, the first failure or None).
    """
    limits = limits or Limits()
    statuses: list[str] = []
    kind = "call" if fn_name else "stdio"
    with SandboxedProgram(code, kind=kind, fn_name=fn_name, limits=limits, mode=mode, reuse=reuse) as prog:
        if prog.compile_error is not None:
            fail = {"index": 0, "status": "runtime_error", "input": cut(tests[0].input),
                    "expected": cut(tests[0].output), "got": "", "error": cut(prog.compile_error)}
            return "runtime_error", ["runtime_error"], fail
        for i, t in enumerate(tests):
            check = ValueComparison(t.output) if fn_name else StdoutComparison(t.output)
            r = prog.run(t.input, sink=check.feed)
            if r is None:
                status, err = "runtime_error", "the sandbox stopped answering (killed by the program?)"
            elif r.status != "ok":
                status, err = r.status, r.err
            else:
                status = "passed" if check.result() else "wrong_answer"
                err = "\n".join(x for x in (r.err, check.note) if x)
            statuses.append(status)
            if status != "passed":
                return status, statuses, {"index": i, "status": status, "input": cut(t.input),
                                          "expected": cut(t.output), "got": check.shown(), "error": cut(err)}
    return "passed", statuses, None


def grade_code(tests: Iterable, response, *, fn_name: str | None = None, timeout: float = 6.0,
               memory_mb: int = 4096, mode: str = "auto", reuse: bool = True, starts_in_thinking: bool = True,
               think_end: str = THINK_END) -> Grade:
    """Grade a response to a code problem: its summary's last Python block, run on `tests` in a sandbox.

    `tests`: (input, output) pairs, {"input", "output"} dicts or CodeTests; `fn_name` makes them call-based
    (`Solution().fn_name(*json_args)`), else stdin/stdout. `timeout`: wall (and CPU) seconds per test;
    `memory_mb`: address-space limit. `reuse=False` runs the program in a sandbox started for it alone
    instead of a fresh fork of a warm sandbox server (slower; docs/livecodebench.md). The grade's `status`
    is passed or the first failing test's status (wrong_answer, timeout, runtime_error, memory_limit;
    no_code when the summary has no Python block), `tests` each run test's status, `failure` the first
    failing test's input, expected and got (cut).
    """
    tests = as_tests(tests)
    limits = Limits(timeout=timeout, memory_mb=memory_mb)
    summary = summary_of(response, starts_in_thinking=starts_in_thinking, think_end=think_end)
    n = len(tests)
    if summary is None:
        return Grade(False, None, thinking_closed=False, status="no_code", tests=(), n_tests=n)
    code = extract_code(summary)
    if code is None:
        return Grade(False, None, thinking_closed=True, status="no_code", tests=(), n_tests=n)
    status, statuses, failure = run_tests(code, tests, fn_name=fn_name, limits=limits, mode=mode, reuse=reuse)
    return Grade(status == "passed", code, thinking_closed=True, status=status, tests=tuple(statuses),
                 n_tests=n, failure=failure)


def grade_code_many(jobs: Sequence[dict], *, workers: int | None = None, **kwargs) -> list[Grade]:
    """grade_code over many jobs ({"tests", "response", "fn_name"} dicts) on `workers` threads (default: the
    CPU count), each job's program in its own sandbox; the grades come back in the jobs' order."""
    workers = usable_cpus() if workers is None else workers
    if workers < 1:
        raise StepscopeError(f"code-grading workers must be at least 1, got {workers}")

    def one(job: dict) -> Grade:
        return grade_code(job["tests"], job["response"], fn_name=job.get("fn_name"), **kwargs)

    if workers == 1 or len(jobs) <= 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        return list(pool.map(one, jobs))
