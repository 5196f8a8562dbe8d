"""grade_code in both sandbox modes: right, wrong, crashing, slow, endless and memory-hungry programs of both
kinds, and hostile ones (a process flood, writes outside, a loopback connection, killing the parent, reading
the parent's environment, an escaped process), each of which must be contained with the grader unharmed.

The bwrap tests skip when bubblewrap is absent, and fail then when STEPSCOPE_REQUIRE_BWRAP=1 (CI sets it and
installs bubblewrap through .ci/debian_package.sh bubblewrap bwrap).
"""

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import require

from stepscope.errors import StepscopeError
from stepscope.evaluate import grade_code
from stepscope.evaluate.code_grading import call_equal, grade_code_many, stdio_equal
from stepscope.evaluate.sandbox import Limits, SandboxedProgram, bwrap_available, resolve_mode

ROOT = os.geteuid() == 0
ADD = [("1 2\n", "3\n"), ("5 7\n", "12\n"), ("-1 1\n", "0\n")]
TWO_SUM = [("[2, 7, 11, 15]\n9", "[0, 1]"), ("[3, 2, 4]\n6", "[1, 2]")]


@pytest.fixture(params=["bwrap", "setsid"])
def mode(request):
    if request.param == "bwrap" and not bwrap_available():
        require("BWRAP", "bubblewrap is not installed or cannot create namespaces here",
                "run .ci/debian_package.sh bubblewrap bwrap")
    return request.param


def answer(code: str) -> str:
    """A response whose thinking closed and whose summary holds `code` as its last Python block."""
    return f"Let me think.\n</think>\n\nHere is my solution:\n```python\n{code}\n```\n"


def grade(tests, code, mode, **kw):
    return grade_code(tests, answer(code), mode=mode, **kw)


# ----------------------------------------------------------------------------------------- plain verdicts

def test_right_and_wrong_stdio(mode):
    g = grade(ADD, "a, b = map(int, input().split())\nprint(a + b)", mode)
    assert g.correct and g.status == "passed" and g.tests == ("passed",) * 3 and g.n_tests == 3
    assert g.thinking_closed and "print(a + b)" in g.answer and g.failure is None
    g = grade(ADD, "a, b = map(int, input().split())\nprint(a * b if a > 1 else a + b)", mode)
    assert not g.correct and g.status == "wrong_answer" and g.tests == ("passed", "wrong_answer")
    assert g.failure == {"index": 1, "status": "wrong_answer", "input": "5 7\n", "expected": "12\n", "got": "35\n",
                         "error": ""}
    assert g.record_fields()["tests"] == ["passed", "wrong_answer"] and g.record_fields()["n_tests"] == 3


def test_call_based(mode):
    code = ("class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
            "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
            "                return (seen[target - x], i)\n            seen[x] = i\n")
    g = grade(TWO_SUM, code, mode, fn_name="twoSum")
    assert g.correct and g.tests == ("passed", "passed")  # a returned tuple counts as a list
    g = grade(TWO_SUM, "class Solution:\n    def twoSum(self, nums, target):\n        return {0, 1}\n", mode,
              fn_name="twoSum")
    assert g.status == "wrong_answer" and g.failure["got"].startswith("{0, 1}")  # a set is not JSON: repr shown
    g = grade(TWO_SUM, "def twoSum(nums, target):\n    return [0, 1]\n", mode, fn_name="twoSum")
    assert g.tests[0] == "passed"  # no class Solution: a top-level function, as LiveCodeBench allows


def test_crashing_slow_endless_memory(mode):
    g = grade(ADD, "raise ValueError('boom')", mode)
    assert g.status == "runtime_error" and "ValueError: boom" in g.failure["error"]
    g = grade(ADD, "def f(:\n  pass", mode)
    assert g.status == "runtime_error" and "SyntaxError" in g.failure["error"]
    g = grade(ADD[:1], "import time\ntime.sleep(0.3)\nprint(3)", mode, timeout=2)
    assert g.correct
    t = time.monotonic()
    g = grade(ADD, "while True:\n    pass", mode, timeout=1)
    assert g.status == "timeout" and g.tests == ("timeout",) and time.monotonic() - t < 8
    g = grade(ADD, "import time\ntime.sleep(60)", mode, timeout=1)  # wall time, no CPU used
    assert g.status == "timeout"
    g = grade(ADD, "x = bytearray(6 << 30)\nprint(3)", mode, memory_mb=1024)
    assert g.status == "memory_limit"
    g = grade(ADD, "import sys\nprint(3)\nsys.exit(1)", mode)  # exit() ends the program normally, like LCB
    assert g.tests[0] == "passed"


def test_no_code_and_thinking_only():
    g = grade_code(ADD, "I would write a loop.\n</think>\n\nNo code, sorry.")
    assert not g.correct and g.status == "no_code" and g.thinking_closed and g.tests == ()
    g = grade_code(ADD, "```python\nprint(3)\n```\nstill thinking")  # code inside the thinking only
    assert not g.correct and g.status == "no_code" and not g.thinking_closed
    with pytest.raises(StepscopeError, match="at least one test"):
        grade_code([], answer("print(1)"))


def test_stdio_comparison_is_livecodebench_like():
    assert stdio_equal("3\n", "3") and stdio_equal("  1 2  \n3\n\n", "1 2\n3")
    assert stdio_equal("1.50 2\n", "1.5 2.0") and stdio_equal("1e2", "100")
    assert not stdio_equal("50000000000000000", "50000000000000001")  # decimals, not floats
    assert not stdio_equal("1 2", "1\n2") and not stdio_equal("YES", "yes") and not stdio_equal("1 2 3", "1 2")
    assert not stdio_equal("a b", "a  c")
    assert call_equal("[0, 1]", "[0, 1]") and call_equal("2", "2.0") and call_equal("true", "1")
    assert not call_equal('"{0, 1}"', "[0, 1]") and not call_equal("garbage", "1")


def test_many_on_workers_in_order(mode):
    jobs = [{"tests": ADD, "response": answer(f"a, b = map(int, input().split())\nprint(a + b + {k % 2})")}
            for k in range(6)]
    grades = grade_code_many(jobs, workers=3, mode=mode)
    assert [g.correct for g in grades] == [k % 2 == 0 for k in range(6)]


# ---------------------------------------------------------------------------------------- hostile programs

def _sleepers(token: str) -> list[int]:
    """Host pids of processes running `sleep <token>`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", token.encode()]:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_escaped_process_is_killed(mode):
    token = f"{secrets.randbelow(10**6) + 10**6}.5"  # a unique sleep duration marks the escaped process
    code = ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sleep', ['sleep', '{token}'])\n    os._exit(0)\n"
            "time.sleep(0.5)\nprint(3)")
    g = grade(ADD[:1], code, mode)
    assert g.correct  # the program itself finished normally
    deadline = time.monotonic() + 5
    while _sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(token) == []  # nothing left running


def test_process_flood_is_stopped(mode):
    code = ("import os, time\nn = 0\ntry:\n    while n < 500:\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)")
    with SandboxedProgram(code, limits=Limits(timeout=5, nproc=64), mode=mode) as prog:
        r = prog.run("")
    assert r is not None and r.status == "ok", r
    n = int(r.out)
    assert n < 64  # the process limit of the program's user stopped it
    if ROOT:
        assert n > 10  # as nobody the flood got going before the limit (as ourselves we already own many)


def test_writes_outside_the_working_folder(mode, tmp_path):
    target = tmp_path / "open"
    target.mkdir()
    target.chmod(0o777)  # even a folder anyone may write to
    protected = tmp_path / "closed"
    protected.mkdir()
    code = ("import os\nres = []\n"
            f"for p in ['{target}/x', '{protected}/x', '/usr/x', 'here.txt']:\n"
            "    try:\n        open(p, 'w').write('hi')\n        res.append('w')\n    except OSError:\n"
            "        res.append('-')\nprint(''.join(res), os.getcwd())")
    with SandboxedProgram(code, mode=mode) as prog:
        r = prog.run("")
        cwd = r.out.split()[1]
    flags = r.out.split()[0]
    assert flags[2] == "-" and flags[3] == "w"  # /usr is read-only; its own folder is writable
    if mode == "bwrap":
        assert flags[:2] == "--" and not (target / "x").exists()  # nothing of ours is even visible
    if ROOT:  # setsid mode: only file permissions protect (it runs as nobody, not as us)
        assert flags[1] == "-" and not (protected / "x").exists()
    if mode == "setsid":
        assert not Path(cwd).exists()  # its private working folder is removed afterwards


class Listener:
    """A TCP listener on 127.0.0.1 (only) that counts connections, started by the test outside the sandbox."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            c.close()

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def test_loopback_connection(mode):
    lis = Listener()
    try:
        code = ("import socket\ns = socket.socket()\ns.settimeout(2)\ntry:\n"
                f"    s.connect(('127.0.0.1', {lis.port}))\n    print('connected')\nexcept OSError as e:\n"
                "    print('blocked', e.errno)")
        with SandboxedProgram(code, mode=mode) as prog:
            r = prog.run("")
        time.sleep(0.3)
    finally:
        lis.close()
    if mode == "bwrap":
        assert r.out.startswith("blocked") and lis.connections == 0
    else:  # docs/livecodebench.md: the setsid fallback does not block the network; this pins that statement
        assert r.out.startswith("connected") and lis.connections == 1


def test_killing_the_parent(mode):
    me = os.getpid()
    code = ("import os, signal\n"
            f"for pid in ([{me}] if {ROOT or mode == 'bwrap'} else []) + [os.getppid()]:\n"
            "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nprint(3)")
    g = grade(ADD, code, mode)
    assert os.getpid() == me  # we are still here
    assert not g.correct and g.status == "runtime_error" and "stopped answering" in g.failure["error"]
    assert grade(ADD, "a, b = map(int, input().split())\nprint(a + b)", mode).correct  # and grading goes on


def test_parent_environment_stays_out(mode, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("STEPSCOPE_TEST_SECRET", secret)
    me = os.getpid()
    code = ("import os\nout = [repr(dict(os.environ))]\n"
            f"for pid in ([{me}] if {ROOT or mode == 'bwrap'} else []) + [os.getppid(), 1]:\n"
            "    try:\n        out.append(open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1'))\n"
            "    except OSError:\n        pass\nprint('\\n'.join(out))")
    with SandboxedProgram(code, mode=mode) as prog:
        r = prog.run("")
    assert r.status == "ok" and "PATH" in r.out
    assert secret not in r.out and "STEPSCOPE_TEST_SECRET" not in r.out


def test_unknown_mode_and_bwrap_required(monkeypatch):
    with pytest.raises(StepscopeError, match="unknown sandbox mode"):
        resolve_mode("docker")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(StepscopeError, match="bubblewrap is not installed"):
        resolve_mode("bwrap")
