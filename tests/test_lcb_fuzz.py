"""The grader cannot be crashed by what a program prints or returns: random bytes, huge and deeply nested values,
NaN and signalling NaN, non-UTF-8, objects with odd __eq__, __repr__ or __iter__ each end in a verdict. The
streamed stdout comparison agrees with a direct implementation of LiveCodeBench's rule on any output cut into
any pieces, and the JSON reader with json.loads; the third-party modules offered in the sandbox are read-only."""

import json
import math
import os
from decimal import Decimal

import pytest
import test_eval_code as code_tests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscope.evaluate import grade_code
from stepscope.evaluate.code_grading import call_equal, stdio_equal
from stepscope.evaluate.outputs import StdoutComparison, loads, values_equal

STATUSES = {"passed", "wrong_answer", "timeout", "runtime_error", "memory_limit", "no_code"}
mode = code_tests.mode  # the bwrap/setsid fixture
ROOT = os.geteuid() == 0


def lcb_equal(got: str, expected: str) -> bool:
    """LiveCodeBench's grade_stdio comparison as it reads, an exception counting as a failed test."""
    def lines(v):
        return [x.strip() for x in v.strip().split("\n")]

    a, b = lines(got), lines(expected)
    if len(a) != len(b):
        return False
    try:
        for x, y in zip(a, b):
            if x == y:
                continue
            dx, dy = [Decimal(t) for t in x.split()], [Decimal(t) for t in y.split()]
            if dx != dy:
                return False
        return True
    except Exception:  # noqa: BLE001  (LiveCodeBench's run_test turns it into a failure)
        return False


TOKENS = st.sampled_from(["1", "1.0", "1.50", "-0", "0", "1e3", "1000", "sNaN", "NaN", "nan", "Infinity", "inf",
                          "1_0", "10", "٣", "3", "x", "YES", "", " ", "  ", "\t", "\r", "\x85", "\u2028", "\x0c",
                          "1e999999999999", "1e-999999999999", "9" * 40, "中"])
TEXT = st.lists(st.one_of(TOKENS, st.just("\n"), st.text(max_size=5)), max_size=30).map("".join)


@settings(max_examples=600, deadline=None)
@given(got=TEXT, expected=TEXT, cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streamed_stdout_comparison_is_livecodebench_rule(got, expected, cuts):
    c = StdoutComparison(expected)
    last = 0
    for k in sorted(set(cuts)):  # the output arrives in arbitrary pieces
        c.feed(got[last:k])
        last = max(last, k)
    c.feed(got[last:])
    assert c.result() == lcb_equal(got, expected) == stdio_equal(got, expected)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
                    | st.integers(4400, 4500).map(lambda k: 3 * 10 ** k + 7),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids, max_size=4),
                    max_leaves=25)


def dumps(v) -> str:
    """json.dumps whatever this interpreter's int-to-str limit (big ints are written by Decimal)."""
    if isinstance(v, bool) or v is None or isinstance(v, (str, float)):
        return json.dumps(v)
    if isinstance(v, int):
        return format(Decimal(v), "f")
    if isinstance(v, list):
        return "[" + ", ".join(dumps(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)}: {dumps(x)}" for k, x in v.items()) + "}"


def same(a, b) -> bool:
    """Equal, with NaN equal to NaN (to compare two readings of one text)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=300, deadline=None)
@given(v=JSON, w=JSON, depth=st.integers(0, 3))
def test_values_read_and_compared_at_any_depth(v, w, depth):
    deep = 2500 * depth  # past the recursion limit, json.loads cannot; ours must read the same value
    text = "[" * deep + dumps(v) + "]" * deep
    got = loads(text)
    for _ in range(deep):
        (got,) = got
    assert same(got, v)
    assert call_equal(dumps(v), dumps(w)) == values_equal(v, w)
    assert call_equal(text, text) == (not any(isinstance(x, float) and math.isnan(x) for x in walk(v)))


def walk(v):
    yield v
    for x in (v if isinstance(v, list) else v.values() if isinstance(v, dict) else ()):
        yield from walk(x)


@pytest.mark.parametrize("bad", ["", "[", "[1,]", "{1: 2}", "1 2", '"\x00"', "1" * 50001, "[" * 5000, "nan"])
def test_unreadable_values_are_unequal_not_errors(bad):
    assert call_equal(bad, "1") is False and call_equal("1", bad) is False


# -- through the sandbox: every outcome is a verdict

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), expected=TEXT)
def test_random_bytes_printed(mode, data, expected):
    g = grade_code([("", expected)], f"</think>\n```python\nimport sys\nsys.stdout.buffer.write({data!r})\n```",
                   mode=mode)
    assert g.status in STATUSES and g.status != "runtime_error"
    assert g.correct == lcb_equal(data.decode("utf-8", "replace"), expected)
    json.dumps(g.failure, ensure_ascii=False).encode("utf-8")  # the record can be written


ODD = {
    "always-equal object": "class X:\n    def __eq__(self, o):\n        return True\nv = X()",
    "list subclass, always equal": "class X(list):\n    def __eq__(self, o):\n        return True\nv = X([9])",
    "int subclass, always equal, wrong value": "class X(int):\n    def __eq__(self, o):\n        return True\nv = X(2)",
    "repr raises": "class X:\n    def __repr__(self):\n        raise SystemExit\nv = X()",
    "iter raises": "class X(dict):\n    def __iter__(self):\n        raise KeyboardInterrupt\nv = X(a=1)",
    "self-containing list": "v = []\nv.append(v)",
    "set": "v = {1}",
    "bytes": "v = b'\\xff'",
    "signalling NaN Decimal": "from decimal import Decimal\nv = Decimal('sNaN')",
    "60,000-digit integer": "v = 10 ** 60000",
    "nested 20,000 deep": "v = []\nfor _ in range(20000):\n    v = [v]",
    "lone surrogate": "v = '\\ud800'",
    "numpy array": "import numpy as np\nv = np.arange(3)",
    "generator": "v = (i for i in range(3))",
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_return_values(name):
    code = ODD[name].replace("\n", "\n        ")
    g = grade_code([("1", "1")], f"</think>\n```python\nclass Solution:\n    def f(self, n):\n        {code}\n"
                                 f"        return v\n```", fn_name="f")
    assert g.status in ("wrong_answer", "runtime_error") and not g.correct, g
    json.dumps(g.failure, ensure_ascii=False).encode("utf-8")


def test_int_subclass_is_compared_by_its_value():
    g = grade_code([("1", "1")], "</think>\n```python\nclass X(int):\n    def __eq__(self, o):\n        return False\n"
                                 "class Solution:\n    def f(self, n):\n        return X(1)\n```", fn_name="f")
    assert g.status == "passed"


# -- the offered third-party modules: importable, read-only; nothing else of the grader's environment

def test_offered_modules_are_read_only_and_alone(mode):
    code = ("import os, numpy, scipy, networkx\nres = []\nfor m in (numpy, scipy, networkx):\n"
            "    try:\n        open(os.path.join(os.path.dirname(m.__file__), 'x'), 'w').write('x')\n"
            "        res.append('w')\n    except OSError:\n        res.append('-')\n"
            "for name in ('torch', 'stepscope', 'transformers'):\n    try:\n        __import__(name)\n"
            "        res.append('i')\n    except ImportError:\n        res.append('-')\nprint(''.join(res))")
    g = grade_code([("", "------")], f"</think>\n```python\n{code}\n```", mode=mode)
    if mode == "bwrap" or ROOT:  # as our own user in setsid mode, a program may write where we may
        assert g.correct, g.failure
    else:
        assert g.failure is None or g.failure["got"].endswith("---\n")
