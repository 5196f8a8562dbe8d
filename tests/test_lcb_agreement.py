"""Differential cases: grade_code against LiveCodeBench's documented rules (lcb_runner/evaluation/testing_util.py)
and real CPython, one case per point where two graders can differ.

Each case states our verdict and LiveCodeBench's harness verdict (pass or not), the latter read off its rules:
the header, one process per program with the module set up once (stdin/stdout programs wrapped in a function,
their imports hoisted; call-based ones as a module with one Solution()), the stripped-line comparison with
Decimal fallback, `prediction == expected` for values, sys.set_int_max_str_digits(50000), and extraction of the
text between the last two lines that contain ```. Where the verdicts differ, the case is one of the deliberate
differences that docs/livecodebench.md's table lists (DIFFERENCES), and ours is real CPython's.
"""

import sys
from dataclasses import dataclass, field

import pytest

from stepscope.evaluate import grade_code

STATUSES = {"passed", "wrong_answer", "timeout", "runtime_error", "memory_limit", "no_code"}


def big(n: int) -> str:
    """str(n) whatever this interpreter's int-to-str limit."""
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return str(n)
    finally:
        sys.set_int_max_str_digits(old)


def fenced(code: str) -> str:
    return f"Thinking.\n</think>\nHere:\n```python\n{code}\n```\n"


def lcb_extract(response: str) -> str:
    """LiveCodeBench's extraction (lcb_runner/utils/extraction_utils.py): the lines between the last two lines
    that contain ``` (here applied to the summary, the text after </think>)."""
    lines = response.split("</think>")[-1].split("\n")
    idx = [i for i, line in enumerate(lines) if "```" in line]
    return "\n".join(lines[idx[-2] + 1:idx[-1]]) if len(idx) >= 2 else ""


@dataclass
class Case:
    code: str
    tests: list
    ours: str  # our status
    lcb: bool  # whether LiveCodeBench's harness passes the program
    fn_name: str | None = None
    timeout: float = 6.0
    response: str | None = None  # the whole response, when the case is about extraction
    kw: dict = field(default_factory=dict)


DEEP = "[" * 3000 + "]" * 3000
SOLUTION = "class Solution:\n    def f(self, n):\n"
NEST = SOLUTION + "        x = []\n        for _ in range(n - 1):\n            x = [x]\n        return x\n"
TWO_BLOCKS = "```python\nprint(3)\n```\nRunning it on the sample gives:\n```\n3\n```\n"

CASES = {
    # -- every comparison path guarded: the outcome is a verdict, the same failure LiveCodeBench reports
    "signalling NaN printed": Case("print('sNaN')", [("", "3")], "wrong_answer", False),
    "signalling NaN on both sides (equal text)": Case("print('sNaN')", [("", "sNaN")], "passed", True),
    "NaN is not equal to NaN": Case("print('NaN')", [("", "nan")], "wrong_answer", False),
    "huge exponent": Case("print('1e999999999999')", [("", "1e999999999999")], "passed", True),
    "huge exponents differ": Case("print('1e999999999999')", [("", "1e-999999999999")], "wrong_answer", False),
    "value nested 3000 deep, right": Case(NEST, [("3000", DEEP)], "passed", True, fn_name="f"),
    "value nested 3000 deep, wrong": Case(NEST, [("3000", "[]")], "wrong_answer", False, fn_name="f"),
    "expected nested 3000 deep": Case(SOLUTION + "        return []\n", [("1", DEEP)], "wrong_answer", False,
                                      fn_name="f"),
    "returned NaN": Case(SOLUTION + "        return float('nan')\n", [("1", "NaN")], "wrong_answer", False,
                         fn_name="f"),
    "returned [NaN] for [NaN]": Case(SOLUTION + "        return [float('nan')]\n", [("1", "[NaN]")], "wrong_answer",
                                     False, fn_name="f"),
    "returned 1.0 for 1, True for 1": Case(SOLUTION + "        return [1.0, True]\n", [("1", "[1, 1]")], "passed",
                                           True, fn_name="f"),
    "non-UTF-8 bytes printed": Case("import sys\nsys.stdout.buffer.write(b'3\\xff\\n')", [("", "3")],
                                    "wrong_answer", False),
    "a million digits, wrong": Case("print('9' * 10**6)", [("", "1")], "wrong_answer", False),
    # -- big integers: LiveCodeBench's limit of 50,000 digits, in the program and in the comparison
    "printing a 19,085-digit integer": Case("print(3 ** 40000)", [("", big(3 ** 40000))], "passed", True),
    "reading a 20,000-digit integer": Case("print(int(input()) % 1000007)",
                                           [("7" * 20000 + "\n", str(7 * (10 ** 20000 - 1) // 9 % 1000007))],
                                           "passed", True),
    "returning a 19,085-digit integer": Case(SOLUTION + "        return 3 ** n\n", [("40000", big(3 ** 40000))],
                                             "passed", True, fn_name="f"),
    "printing past 50,000 digits": Case("print(10 ** 50000)", [("", "1" + "0" * 50000)], "runtime_error", False),
    # -- no output cap that cuts a correct answer; lengths in characters
    "answer padded to 200,000 characters": Case("print(f'{3:>200000}')", [("", "3")], "passed", True),
    "100,000 non-ASCII characters": Case("print('中' * 100000)", [("", "中" * 100000)], "passed", True),
    "300,000 trailing zeros (Decimal)": Case("print('1.5' + '0' * 300000)", [("", "1.5")], "passed", True),
    # -- stdin line ends as CPython reads them (no newline translation)
    "len(input()) on abc\\r\\n": Case("print(len(input()))", [("abc\r\n", "4")], "passed", True),
    "readline keeps \\r": Case("import sys\nprint(repr(sys.stdin.readline()))", [("x\r\n", "'x\\r\\n'")],
                               "passed", True),
    # -- all of a program's tests in one process, the module set up once
    "module set-up charged once (call)": Case(
        "import time\ntime.sleep(1.8)\n" + SOLUTION + "        time.sleep(1.4)\n        return n\n",
        [("1", "1"), ("2", "2")], "passed", True, fn_name="f", timeout=3.0),  # one fork per test: 3.2 s each
    "Solution state between tests": Case(
        "class Solution:\n    calls = 0\n    def f(self, n):\n        Solution.calls += 1\n        return Solution.calls\n",
        [("0", "1"), ("0", "2"), ("0", "3")], "passed", True, fn_name="f"),
    "module state between stdin tests": Case(
        "import math\nmath.k = getattr(math, 'k', 0) + 1\nprint(math.k)", [("", "1"), ("", "2"), ("", "3")],
        "passed", True),
    "a stdin program's globals start afresh": Case("seen = []\nseen.append(1)\nprint(len(seen))",
                                                   [("", "1"), ("", "1")], "passed", True),
    # -- LiveCodeBench's third-party modules
    "numpy": Case("import numpy as np\nprint(int(np.array(list(map(int, input().split()))).sum()))",
                  [("1 2 3", "6")], "passed", True),
    "scipy": Case("from scipy.special import comb\nprint(int(comb(10, 3, exact=True)))", [("", "120")], "passed",
                  True),
    "networkx": Case("import networkx as nx\nprint(nx.shortest_path_length(nx.path_graph(4), 0, 3))", [("", "3")],
                     "passed", True),
    "a numpy integer returned": Case("import numpy as np\n" + SOLUTION + "        return np.int64(n) * 2\n",
                                     [("4", "8")], "passed", True, fn_name="f"),
    "sys.exit(1) ends normally": Case("import sys\nprint(3)\nsys.exit(1)", [("", "3")], "passed", True),
    # -- deliberate differences (DIFFERENCES): real CPython, where LiveCodeBench's harness fails the program
    "an object whose == is always true": Case(
        "class Any:\n    def __eq__(self, other):\n        return True\n" + SOLUTION + "        return Any()\n",
        [("1", "[1, 2]")], "wrong_answer", True, fn_name="f"),  # LiveCodeBench's == asks the object
    "global statement": Case("n = 0\ndef inc():\n    global n\n    n += 1\ninc()\nprint(n)", [("", "1")], "passed",
                             False),
    "main guard before other code": Case("def main():\n    print(3)\nif __name__ == '__main__':\n    main()\nx = 1",
                                         [("", "3")], "passed", False),
    "open(0)": Case("print(sum(map(int, open(0).read().split())))", [("1 2", "3")], "passed", False),
    "sys.stdin.buffer": Case("import sys\nprint(sum(map(int, sys.stdin.buffer.read().split())))", [("1 2", "3")],
                             "passed", False),
    "os._exit after flushing": Case("import os, sys\nprint(3)\nsys.stdout.flush()\nos._exit(0)", [("", "3")],
                                    "passed", False),
    "a thread that prints after the script ends": Case(
        "import threading, time\ndef main():\n    time.sleep(0.2)\n    print(3)\nthreading.Thread(target=main).start()",
        [("", "3")], "passed", False),
    "extraction: a sample-output block after the code": Case("", [("", "3")], "passed", False,
                                                             response="Done.\n</think>\n" + TWO_BLOCKS),
    "extraction: prose mentions ``` after the code": Case(
        "", [("", "3")], "passed", False, response="Done.\n</think>\n```python\nprint(3)\n```\nThe ``` fences hold it."),
    "extraction: a C++ block after the Python one": Case(
        "", [("", "3")], "passed", False,
        response="Done.\n</think>\n```python\nprint(3)\n```\n```cpp\nint main() { return 0; }\n```\n"),
    "extraction: one bare block": Case("", [("", "3")], "passed", True, response="Done.\n</think>\n```\nprint(3)\n```"),
}

# the cases where we deliberately differ from LiveCodeBench's harness (docs/livecodebench.md, "Differences")
DIFFERENCES = {"an object whose == is always true", "global statement", "main guard before other code", "open(0)",
               "sys.stdin.buffer", "os._exit after flushing", "a thread that prints after the script ends",
               "extraction: a sample-output block after the code", "extraction: prose mentions ``` after the code",
               "extraction: a C++ block after the Python one"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case(name):
    c = CASES[name]
    response = c.response or fenced(c.code)
    g = grade_code(c.tests, response, fn_name=c.fn_name, timeout=c.timeout, **c.kw)
    assert g.status in STATUSES
    assert g.status == c.ours, (g.status, g.failure)
    agree = (g.status == "passed") == c.lcb
    assert agree != (name in DIFFERENCES), "a difference from LiveCodeBench that is not listed, or the reverse"


def test_lcb_extraction_takes_another_block_where_we_differ():
    for name in sorted(DIFFERENCES):
        c = CASES[name]
        if name.startswith("extraction"):
            ours = grade_code(c.tests, c.response).answer
            assert ours.strip() == "print(3)" and lcb_extract(c.response).strip() != "print(3)"
    assert lcb_extract(CASES["extraction: one bare block"].response).strip() == "print(3)"
