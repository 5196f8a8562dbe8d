"""LiveCodeBench's output comparisons, safe on anything a program prints or returns.

The rules are LiveCodeBench's (lcb_runner/evaluation/testing_util.py):
- stdin/stdout: both outputs stripped and split into lines, each line stripped; the line counts must agree,
  and each pair of lines is equal as text or, failing that, as lists of `Decimal` numbers (`1.50` equals `1.5`,
  `50000000000000000` differs from `50000000000000001`).
- call-based: the returned value (a top-level tuple taken as a list) must `==` the JSON-decoded expected output.

What is ours: every path ends in a verdict. A comparison that raises (a signalling NaN's InvalidOperation, a
value nested thousands deep, an integer of more than 50,000 digits, memory) counts as "not equal", which is the
test's failure LiveCodeBench also reports there (its grader catches the exception and fails the test). The
stdout comparison reads the output piece by piece as it arrives, so no output is cut before it is compared:
its memory is bounded by the longest line, not by a cap that a correct answer in padded fields could exceed.
Values are parsed without recursion limits and with integers of up to 50,000 digits (LiveCodeBench's
`sys.set_int_max_str_digits(50000)`), without changing this process's own limit.
"""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal
from json.decoder import scanstring

INT_DIGITS = 50000  # LiveCodeBench's int-to-str limit
CUT = 300  # characters kept of a failing test's output in its report


def cut(s: str, n: int = CUT) -> str:
    return s if len(s) <= n else s[:n // 2] + " ...(cut)... " + s[-(n // 2):]


def stripped_lines(text: str) -> list[str]:
    """LiveCodeBench's lines of an output: the whole stripped, split at "\\n", each line stripped."""
    return [line.strip() for line in text.strip().split("\n")]


def lines_equal(got: str, want: str) -> bool:
    """Two stripped lines: equal as text, or as lists of Decimal numbers (token by token: the verdict of
    LiveCodeBench's all-or-nothing conversion, since any token that is not a number fails both ways)."""
    if got == want:
        return True
    b = want.split()
    a = got.split(None, len(b))  # at most one token more than expected: enough to see the counts differ
    if len(a) != len(b):
        return False
    try:
        return all(Decimal(x) == Decimal(y) for x, y in zip(a, b))
    except (ArithmeticError, ValueError, TypeError, MemoryError):  # sNaN, malformed, huge: not equal
        return False


class Shown:
    """The first and last characters of a stream (what a failure report shows of it) and its length."""

    def __init__(self) -> None:
        self.head, self.tail, self.n = "", "", 0

    def add(self, text: str) -> None:
        if len(self.head) < CUT:
            self.head += text[:CUT - len(self.head)]
        self.tail = (self.tail + text[-(CUT // 2):])[-(CUT // 2):]
        self.n += len(text)

    def text(self) -> str:
        return self.head if self.n <= CUT else self.head[:CUT // 2] + " ...(cut)... " + self.tail


class StdoutComparison:
    """LiveCodeBench's stdout comparison fed the output piece by piece (`feed`), decided by `result()`.

    Equivalent to comparing `stripped_lines(output)` with `stripped_lines(expected)`: lines are compared as
    they complete, blank lines at either end are dropped, and after the first difference the rest is only
    counted for the report (`shown()`)."""

    def __init__(self, expected: str) -> None:
        self.want = stripped_lines(expected)
        self.k = 0  # the next expected line
        self.started = False  # a non-blank line was seen
        self.blank = 0  # blank lines since the last non-blank one (they count only if another follows)
        self.partial: list[str] = []  # the pieces of the line being read
        self.same = True
        self.note = ""
        self.seen = Shown()

    def feed(self, text: str) -> None:
        self.seen.add(text)
        if not self.same:
            return
        parts = text.split("\n")
        self.partial.append(parts[0])
        for part in parts[1:]:
            line, self.partial = "".join(self.partial), [part]
            self._line(line)
            if not self.same:
                self.partial = []
                return

    def _line(self, raw: str) -> None:
        line = raw.strip()
        if not line:
            self.blank += self.started
            return
        self.started = True
        for got in [""] * self.blank + [line]:
            if self.k >= len(self.want) or not lines_equal(got, self.want[self.k]):
                self.same = False
                return
            self.k += 1
        self.blank = 0

    def result(self) -> bool:
        """Whether the whole output fed so far equals the expected output."""
        if self.same:
            self._line("".join(self.partial))
            self.partial = []
        if not self.started:  # an empty output is the one line ""
            return self.want == [""]
        return self.same and self.k == len(self.want)

    def shown(self) -> str:
        return self.seen.text()


# ------------------------------------------------------------------------------------------ JSON values

_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_SPACE = re.compile(r"[ \t\n\r]*")
_WORDS = ("null", "true", "false", "NaN", "Infinity", "-Infinity")


def _constant(word: str):
    """A JSON word's value; each NaN a new object, as a program's NaN is (json.loads shares one NaN object, and
    Python's == on lists takes identical objects as equal: [nan] would equal [nan])."""
    return {"null": None, "true": True, "false": False, "NaN": float("nan"), "Infinity": float("inf"),
            "-Infinity": float("-inf")}[word]


def _int(digits: str) -> int:
    """A JSON integer of up to INT_DIGITS digits, whatever this process's own int-to-str limit."""
    if len(digits.lstrip("-")) > INT_DIGITS:
        raise ValueError(f"an integer of more than {INT_DIGITS} digits")
    try:
        return int(digits)
    except ValueError:  # past this interpreter's own limit: Decimal converts without it
        return int(Decimal(digits))


def _flat_loads(s: str):
    """json.loads without recursion: the same values (NaN and Infinity accepted, the last duplicate key
    winning), for values nested deeper than the interpreter's recursion limit allows."""
    stack: list = []  # open containers: [list] or [dict, pending key]
    i, n = _SPACE.match(s, 0).end(), len(s)
    value, have = None, False
    while True:
        if have:  # a value is complete: put it into the open container, or finish
            have = False
            i = _SPACE.match(s, i).end()
            if not stack:
                if i != n:
                    raise ValueError(f"extra data at {i}")
                return value
            top = stack[-1]
            if isinstance(top[0], list):
                top[0].append(value)
            else:
                top[0][top[1]] = value
            close = "]" if isinstance(top[0], list) else "}"
            if s.startswith(close, i):
                value, have, i = stack.pop()[0], True, i + 1
                continue
            if not s.startswith(",", i):
                raise ValueError(f"expected , or {close} at {i}")
            i = _SPACE.match(s, i + 1).end()
            if isinstance(top[0], dict):
                i = _key(s, i, top)
            continue
        c = s[i:i + 1]
        if c == "[":
            stack.append([[]])
            i = _SPACE.match(s, i + 1).end()
            if s.startswith("]", i):
                value, have, i = stack.pop()[0], True, i + 1
            continue
        if c == "{":
            stack.append([{}, None])
            i = _SPACE.match(s, i + 1).end()
            if s.startswith("}", i):
                value, have, i = stack.pop()[0], True, i + 1
            else:
                i = _key(s, i, stack[-1])
            continue
        if c == '"':
            value, i = scanstring(s, i + 1)
        elif (m := _NUMBER.match(s, i)) is not None:
            whole, frac, exp = m.groups()
            value = float(whole + (frac or "") + (exp or "")) if frac or exp else _int(whole)
            i = m.end()
        else:
            word = next((w for w in _WORDS if s.startswith(w, i)), None)
            if word is None:
                raise ValueError(f"expected a value at {i}")
            value, i = _constant(word), i + len(word)
        have = True


def _key(s: str, i: int, top: list) -> int:
    """Read `"key" :` at i into the open dict's pending key; the index after the colon and white space."""
    if not s.startswith('"', i):
        raise ValueError(f"expected a key at {i}")
    top[1], i = scanstring(s, i + 1)
    i = _SPACE.match(s, i).end()
    if not s.startswith(":", i):
        raise ValueError(f"expected : at {i}")
    return _SPACE.match(s, i + 1).end()


def loads(text: str):
    """A JSON value as json.loads gives it, at any depth and with integers of up to INT_DIGITS digits."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if 0 < limit <= INT_DIGITS:  # the fast way, when every integer it accepts is one LiveCodeBench's accepts
        try:
            return json.loads(text, parse_constant=_constant)
        except RecursionError:
            return _flat_loads(text)
        except ValueError:
            pass  # malformed, or an integer past this interpreter's limit: once more with ours
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except RecursionError:
        return _flat_loads(text)


def values_equal(a, b) -> bool:
    """Python's == on JSON values (1 == 1.0 == True, NaN unequal to itself), at any depth."""
    try:
        return a == b
    except RecursionError:
        pass
    pairs = [(a, b)]
    while pairs:
        x, y = pairs.pop()
        if isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            pairs.extend(zip(x, y))
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                return False
            pairs.extend((x[k], y[k]) for k in x)
        elif isinstance(x, (list, dict)) or isinstance(y, (list, dict)) or not x == y:
            return False
    return True


class ValueComparison:
    """A call-based test: the launcher's result ("v" and the value's JSON, or "r" and a repr) fed piece by
    piece, compared by `result()` with the JSON of the expected output."""

    def __init__(self, expected: str) -> None:
        self.expected = expected
        self.pieces: list[str] = []
        self.note = ""

    def feed(self, text: str) -> None:
        self.pieces.append(text)

    def result(self) -> bool:
        payload = "".join(self.pieces)
        if not payload.startswith("v"):
            return False  # not plain data (a set, an object): its repr is shown
        try:
            want = loads(self.expected)
        except (ValueError, MemoryError) as e:
            self.note = f"the expected output is not a JSON value LiveCodeBench can read ({e})"[:300]
            return False
        try:
            return values_equal(loads(payload[1:]), want)
        except (ValueError, MemoryError) as e:
            self.note = f"the returned value cannot be compared ({e})"[:300]
            return False

    def shown(self) -> str:
        return cut("".join(self.pieces)[1:])
