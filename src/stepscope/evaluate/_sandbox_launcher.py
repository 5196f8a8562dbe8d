"""Runs one model-written program on its tests inside the sandbox: limits, one forked child per test, JSON lines.

stepscope.evaluate.sandbox starts this file's text as `python -I -c <text>` inside bubblewrap (or a plain
setsid subprocess) as the unprivileged user; it imports nothing from stepscope and needs only the standard
library. Protocol, one JSON object per line:

  in  (stdin):  {"code", "kind": "stdio"|"call", "fn_name", "timeout", "cpu", "memory", "nproc", "fsize",
                 "nofile"}   then per test {"input": str, "cap": int}; EOF ends the run
  out (stdout): {"ready": true} or {"compile_error": str}; then per test
                {"status": "ok"|"timeout"|"runtime_error"|"memory_limit", "out": str, "err": str, "time": s,
                 "truncated": bool}

Everything here runs as the program's own user: nothing it reports is trusted to decide a pass. The outputs
are compared outside the sandbox with the expected outputs, which never enter it; a hostile program can
only make its own tests fail.
"""

import json
import os
import resource
import select
import signal
import sys
import time

# LiveCodeBench prepends these imports to every program (lcb_runner/evaluation/testing_util.py)
HEADER = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\n"
    "from statistics import *\nfrom itertools import *\nfrom functools import *\nfrom operator import *\n"
    "from io import *\nfrom sys import *\nfrom json import *\nfrom builtins import *\nfrom typing import *\n"
    "import string\nimport re\nimport datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\n"
    "import math\nimport random\nimport statistics\nimport itertools\nimport functools\nimport operator\n"
    "import io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n")
MEMORY_EXIT = 86  # the child's exit status for a MemoryError
ERR_TAIL = 2000  # characters of stderr kept


def send(fd, obj):
    data = (json.dumps(obj) + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def limit(which, value):
    if value is not None:
        resource.setrlimit(which, (value, value))


def plain(v, top=True):
    """v as JSON-able data when Python's == would compare it with a JSON value like LiveCodeBench does, else
    raise TypeError (LiveCodeBench turns only a top-level tuple into a list)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list) or (top and isinstance(v, tuple)):
        return [plain(x, False) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: plain(x, False) for k, x in v.items()}
    raise TypeError(f"a {type(v).__name__} is not plain JSON data")


def child(req, code, stdin_fd, out_fd, err_fd, res_fd, args):
    """The forked child: runs the program once (stdio) or calls its method once (call). Never returns."""
    try:
        os.setpgid(0, 0)
        cpu = req["cpu"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
        os.closerange(3, res_fd)  # the protocol pipes and the other memfds; only the result fd stays
        os.closerange(res_fd + 1, 1 << 16)
        status = 0
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        try:
            exec(code, scope)
            if req["kind"] == "call":
                sol = scope["Solution"]() if "class Solution" in req["code"] else None
                fn = getattr(sol, req["fn_name"]) if sol is not None else scope[req["fn_name"]]
                result = fn(*args)
                try:
                    payload = {"value": plain(result)}
                except (TypeError, RecursionError, ValueError):
                    payload = {"repr": repr(result)[:1000]}
                os.write(res_fd, json.dumps(payload).encode("utf-8"))
        except SystemExit:
            pass  # LiveCodeBench counts exit() as a normal end
        except MemoryError:
            status = MEMORY_EXIT
        except BaseException:
            import traceback  # only here: the launcher's start stays short

            traceback.print_exc()
            status = 1
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:
                pass
        os._exit(status)
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except BaseException:
        os._exit(1)


def memfd(name, data=b""):
    fd = os.memfd_create(name, 0)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_fd(fd, cap):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, n = [], 0
    while n < cap + 1:
        b = os.read(fd, min(1 << 20, cap + 1 - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    data = b"".join(chunks)
    return data[:cap].decode("utf-8", errors="replace"), len(data) > cap


def wait(pid, timeout):
    """(wait status, timed out): waits up to `timeout` seconds, then kills the child's process group."""
    deadline = time.monotonic() + timeout
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pass
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if pidfd is not None:
            os.close(pidfd)
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    return os.waitpid(pid, 0)[1], True


def run_test(req, code, test):
    cap = int(test.get("cap", 1 << 20))
    args = None
    stdin_data = b""
    if req["kind"] == "call":
        try:
            args = [json.loads(line) for line in test["input"].split("\n")]
        except ValueError as e:
            return {"status": "runtime_error", "out": "", "err": f"bad call arguments: {e}", "time": 0.0}
    else:
        stdin_data = test["input"].encode("utf-8")
    fds = [memfd("stdin", stdin_data), memfd("stdout"), memfd("stderr"), memfd("result")]
    sys.stdout.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, code, fds[0], fds[1], fds[2], fds[3], args)
    status, timed_out = wait(pid, float(req["timeout"]))
    elapsed = time.monotonic() - start
    out, truncated = read_fd(fds[1], cap)
    err, _ = read_fd(fds[2], 1 << 16)
    if req["kind"] == "call":
        out, truncated = read_fd(fds[3], cap)
    for fd in fds:
        os.close(fd)
    err = err[-ERR_TAIL:]
    if timed_out:
        state = "timeout"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        state = "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) else "runtime_error"
        err = (err + f"\nkilled by signal {signal.Signals(sig).name}").strip()[-ERR_TAIL:]
    elif os.WEXITSTATUS(status) == MEMORY_EXIT:
        state = "memory_limit"
    elif os.WEXITSTATUS(status) != 0:
        state = "runtime_error"
    else:
        state = "ok"
    return {"status": state, "out": out, "err": err, "time": round(elapsed, 4), "truncated": truncated}


def main():
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    req = json.loads(proto_in.readline())
    limit(resource.RLIMIT_AS, req.get("memory"))
    limit(resource.RLIMIT_NPROC, req.get("nproc"))
    limit(resource.RLIMIT_FSIZE, req.get("fsize"))
    limit(resource.RLIMIT_NOFILE, req.get("nofile"))
    limit(resource.RLIMIT_CORE, 0)
    try:
        code = compile(HEADER + req["code"], "<solution>", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        send(proto_out, {"compile_error": f"{type(e).__name__}: {e}"[:ERR_TAIL]})
        return
    exec(compile(HEADER, "<header>", "exec"), {})  # imported once here, inherited by every forked child
    send(proto_out, {"ready": True})
    for line in proto_in:
        if not line.strip():
            break
        send(proto_out, run_test(req, code, json.loads(line)))


if __name__ == "__main__":
    main()
