"""Answer extraction and grading of a response's summary: math by math-verify, multiple choice by letter.

Only the summary is graded (the text after the thinking ends), and a response whose thinking never closed
is wrong: a model that ran out of tokens mid-thought has not answered, whatever numbers its thinking holds.

What counts as the summary:
- a `Trace`: its summary segment (exact, from the token sequence);
- a plain string: what its format (`fmt`; by default read from the text, `stepscope.formats.response_summary`)
  calls the summary: the text after the LAST thinking end marker (`</think>`), or for GPT-OSS harmony text
  the `final` channel message. A string without an end marker is "thinking never closed" when the response
  starts inside the thinking (`starts_in_thinking=True`, the default: R1/QwQ templates put `<think>` in the
  prompt) or opens the thinking itself; with `starts_in_thinking=False` and no start marker, the whole string
  is the summary (a model that does not think).

math-verify protects itself with `signal.alarm`, which fails outside the main thread. Here it runs in a
small pool of helper processes with its own timeouts off; the deadline is enforced from this side (a late
helper is killed and replaced), so grading works from threads, thread pools and process pools alike.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepscopeError
from ..formats import THINK, Format, response_summary

THINK_END = THINK.think_end  # the default of the `think_end=` shorthand (the think format's own marker)
DEFAULT_TIMEOUT = 10.0  # seconds for one parse + verify
_WORKER_FILE = Path(__file__).with_name("_verify_worker.py")
_STARTUP_TIMEOUT = 120.0  # importing sympy and math-verify in a fresh process


GRADER_ERROR = "grader_error"  # the status of a sample whose grading failed inside the grader (counted as wrong)


@dataclass(frozen=True)
class Grade:
    """The verdict on one response: `answer` is the extracted final answer (None if none was found).

    Code grades (stepscope.evaluate.code_grading) also say how the program did: `answer` is the program,
    `status` passed or the first failing test's status (wrong_answer, timeout, runtime_error, memory_limit,
    no_code), `tests` each run test's status (tests run in order up to the first failure), `n_tests` how many
    tests there are, `failure` the first failing test (index, status, input, expected, got, error; cut). A
    grade of status GRADER_ERROR (any kind of problem) says the grading failed inside the grader: `failure`
    holds the error.
    """

    correct: bool
    answer: str | None
    thinking_closed: bool
    timed_out: bool = False
    status: str | None = None
    tests: tuple[str, ...] | None = None
    n_tests: int | None = None
    failure: dict | None = field(default=None, hash=False)

    def record_fields(self) -> dict:
        """What a run record keeps beyond correct/answer/thinking_closed: the code fields (none otherwise)."""
        if self.status is None:
            return {}
        return {"status": self.status, "tests": list(self.tests or ()), "n_tests": self.n_tests,
                "failure": self.failure}


# ---------------------------------------------------------------------------------------------------- summary

def _trace_summary(trace) -> str | None:
    """The summary segment's text of a Trace, or None when its thinking never closed."""
    if not trace.thinking_closed:
        return None
    return trace.segment_text("summary")


def summary_of(response, *, starts_in_thinking: bool = True, think_end: str = THINK_END,
               fmt: str | Format | None = None) -> str | None:
    """The text to grade: the summary of `response` (a Trace or a string), or None if thinking never closed.

    A string's format is `fmt` (a registered name or a Format), else read from the text; `think_end` other than
    `</think>` is shorthand for a format that ends its thinking with that string.
    """
    if not isinstance(response, str):
        if hasattr(response, "segment_text") and hasattr(response, "thinking_closed"):
            return _trace_summary(response)
        raise StepscopeError(f"cannot grade a {type(response).__name__}; pass a string or a Trace")
    if fmt is None and think_end != THINK_END:
        fmt = Format("markers", THINK.think_start, think_end)
    return response_summary(response, fmt, starts_in_thinking=starts_in_thinking)


# ----------------------------------------------------------------------------------------- multiple choice

_BOXED_CHOICE = re.compile(r"\\boxed\s*\{\s*(?:\\text(?:bf)?\s*\{\s*)?\(?\s*([A-J])\s*\)?\s*\}?\s*\}")
_SAID_CHOICE = re.compile(  # "the answer is (C)", "Answer: C", "**Answer:** (C)"; the letter must be upper case
    r"(?i:answer)\s*(?:\*\*)?\s*(?:(?i:is)|:)\s*(?:\*\*)?\s*(?:(?i:option)\s*)?\(?\s*([A-J])\s*\)?(?![A-Za-z0-9])")


def extract_choice(summary: str) -> str | None:
    """The last chosen letter in `summary`: the later of the last `\\boxed{X}` and the last "answer is (X)"."""
    best: tuple[int, str] | None = None
    for pat in (_BOXED_CHOICE, _SAID_CHOICE):
        for m in pat.finditer(summary):
            if best is None or m.end() >= best[0]:
                best = (m.end(), m.group(1).upper())
    return best[1] if best else None


def grade_choice_detail(gold_letter: str, response, *, starts_in_thinking: bool = True,
                        think_end: str = THINK_END, fmt: str | Format | None = None) -> Grade:
    gold = gold_letter.strip().strip("()").upper()
    if not re.fullmatch(r"[A-J]", gold):
        raise StepscopeError(f"a multiple-choice gold answer must be one letter A-J, got {gold_letter!r}")
    summary = summary_of(response, starts_in_thinking=starts_in_thinking, think_end=think_end, fmt=fmt)
    if summary is None:
        return Grade(False, None, thinking_closed=False)
    letter = extract_choice(summary)
    return Grade(letter == gold, letter, thinking_closed=True)


def grade_choice(gold_letter: str, response, *, starts_in_thinking: bool = True,
                 think_end: str = THINK_END, fmt: str | Format | None = None) -> bool:
    """True when the summary's last `\\boxed{X}` or "answer is (X)" names `gold_letter`."""
    return grade_choice_detail(gold_letter, response, starts_in_thinking=starts_in_thinking,
                               think_end=think_end, fmt=fmt).correct


# ------------------------------------------------------------------------------------------ math-verify pool

class _Worker:
    """One helper process running _verify_worker.py; answers arrive through a reader thread and a queue."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1)
        self.answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self._get(_STARTUP_TIMEOUT)
        if first is None or not json.loads(first).get("ready"):
            self.kill()
            msg = json.loads(first).get("error") if first else "no answer"
            raise StepscopeError(f"the math-verify helper process did not start ({msg})")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put(None)  # the process ended

    def _get(self, timeout: float | None) -> str | None:
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            return None

    def ask(self, request: dict, timeout: float | None) -> dict | None:
        """The answer, or None when it came late (the process is then killed) or the process died."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None
        line = self._get(timeout)
        if line is None:
            self.kill()
            return None
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


class _Pool:
    """Idle helper processes; a caller takes one (starting a new one if none is idle) and returns it after."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []

    def take(self) -> _Worker:
        with self.lock:
            while self.idle:
                w = self.idle.pop()
                if w.alive():
                    return w
        return _Worker()

    def give(self, w: _Worker) -> None:
        if w.alive():
            with self.lock:
                self.idle.append(w)

    def close(self) -> None:
        with self.lock:
            workers, self.idle = self.idle, []
        for w in workers:
            w.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # a forked child must not share its parent's pipes
            _POOL = _Pool()
        return _POOL


@atexit.register
def close_workers() -> None:
    """Stop the helper processes of this process (they also stop by themselves when it exits)."""
    if _POOL is not None and _POOL.pid == os.getpid():
        _POOL.close()


def _require_math_verify() -> None:
    if importlib.util.find_spec("math_verify") is None:
        raise StepscopeError("math grading needs the package 'math-verify': pip install math-verify")


def gold_for_parsing(gold: str) -> str:
    """Wrap a bare gold answer in \\boxed{} so that math-verify reads all of it as LaTeX (`3, 5, 7`, `6 - 5i`)."""
    gold = gold.strip()
    if "\\boxed" in gold or "$" in gold.replace("\\$", ""):
        return gold
    return "\\boxed{" + gold + "}"


def verify_answer(gold: str, text: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Grade:
    """math-verify `text` against `gold` (gold parsed first, `verify(gold, pred)` order), with a deadline."""
    _require_math_verify()
    pool = _pool()
    w = pool.take()
    ans = w.ask({"gold": gold_for_parsing(gold), "pred": text}, timeout)
    if ans is None:
        return Grade(False, None, thinking_closed=True, timed_out=True)
    pool.give(w)
    if "correct" not in ans:
        raise StepscopeError(f"the math-verify helper failed: {ans.get('error')}")
    return Grade(bool(ans["correct"]), ans.get("answer"), thinking_closed=True)


def grade_math_detail(gold: str, response, *, timeout: float | None = DEFAULT_TIMEOUT,
                      starts_in_thinking: bool = True, think_end: str = THINK_END,
                      fmt: str | Format | None = None) -> Grade:
    """Grade with details: the extracted answer, whether thinking closed, whether the deadline passed."""
    summary = summary_of(response, starts_in_thinking=starts_in_thinking, think_end=think_end, fmt=fmt)
    if summary is None:
        return Grade(False, None, thinking_closed=False)
    if not summary.strip():
        return Grade(False, None, thinking_closed=True)
    return verify_answer(str(gold), summary, timeout=timeout)


def grade_math(gold: str, response, *, timeout: float | None = DEFAULT_TIMEOUT,
               starts_in_thinking: bool = True, think_end: str = THINK_END, fmt: str | Format | None = None) -> bool:
    """True when math-verify finds the summary's final answer equal to `gold` (a timeout counts as wrong)."""
    return grade_math_detail(gold, response, timeout=timeout, starts_in_thinking=starts_in_thinking,
                             think_end=think_end, fmt=fmt).correct
