"""Runs model-written programs inside the sandbox: a server that forks one launcher per program, one child per test.

stepscope.evaluate.sandbox_server starts this file's text as `python -I -S -c <text>` inside bubblewrap (or a
plain setsid subprocess) as the unprivileged user; it imports nothing from stepscope and needs only the
standard library. The server imports LiveCodeBench's header modules once, then serves programs one at a time:
each program is a fresh fork of it (its own session, limits and random seed; the server itself never runs
program code), and after each program the server kills every process the program left (it is their subreaper:
none can leave it), empties the writable folders and checks that its own limits, CPU affinity and priority are
as they were (in bwrap mode also removes the System V IPC objects of its namespace); the grader discards a
server that says otherwise. Protocol, one JSON object per line:

  server  in:  {"serve": {"workdirs": [path, ...], "protect": bool, "ipc": bool}}
                                                                           out: {"hello": true, "reusable": bool}
  program in:  {"code", "kind": "stdio"|"call", "fn_name", "timeout", "cpu", "memory", "nproc", "fsize",
                "nofile"}                                                 out: {"ready": true} | {"compile_error"}
  test    in:  {"input": str, "cap": int}            out: {"status": "ok"|"timeout"|"runtime_error"|"memory_limit",
                                                           "out": str, "err": str, "time": s, "truncated": bool}
  end     in:  {"end": true}                         out: {"done": true, "clean": bool, "why": str|null}

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


class LineReader:
    """Unbuffered-enough line reading of a pipe: a forked launcher inherits exactly the bytes not yet consumed."""

    def __init__(self, fd):
        self.fd, self.buf = fd, bytearray()

    def readline(self):
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                line, self.buf = bytes(self.buf), bytearray()
                return line
            self.buf += chunk
        i = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:i])
        del self.buf[:i]
        return line


def program(req, proto_in, proto_out, home, home_fd):
    """The forked launcher of one program: its own session, working folder and limits; one child per test.
    Never returns."""
    try:
        os.setsid()
        os.fchdir(home_fd)
        os.close(home_fd)
        os.environ["HOME"] = os.environ["TMPDIR"] = home
        limit(resource.RLIMIT_AS, req.get("memory"))
        limit(resource.RLIMIT_NPROC, req.get("nproc"))
        limit(resource.RLIMIT_FSIZE, req.get("fsize"))
        limit(resource.RLIMIT_NOFILE, req.get("nofile"))
        limit(resource.RLIMIT_CORE, 0)
        limit(resource.RLIMIT_MSGQUEUE, 0)  # no POSIX message queue: they could outlive the program unseen
        try:
            code = compile(HEADER + req["code"], "<solution>", "exec")
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            code = None
            send(proto_out, {"compile_error": f"{type(e).__name__}: {e}"[:ERR_TAIL]})
        if code is not None:
            send(proto_out, {"ready": True})
        while True:
            line = proto_in.readline()
            if not line.strip():
                break
            test = json.loads(line)
            if "end" in test or code is None:
                break
            send(proto_out, run_test(req, code, test))
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------- the server

def load_libc():
    """The C library through ctypes, or None where ctypes cannot load it (then no server is reused)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, IPC_RMID = 4, 36, 0


def remove_ipc(libc):
    """Remove every System V shared memory segment, semaphore set and message queue (bwrap mode: the IPC
    namespace is the server's own); True when none is left."""
    removers = {"shm": lambda i: libc.shmctl(i, IPC_RMID, None), "sem": lambda i: libc.semctl(i, 0, IPC_RMID),
                "msg": lambda i: libc.msgctl(i, IPC_RMID, None)}
    left = False
    for kind, remove in removers.items():
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                ids = [int(line.split()[1]) for line in f.readlines()[1:] if line.strip()]
        except OSError:
            return False
        for i in ids:
            if remove(i) != 0:
                left = True
    return not left


def own_state():
    """What a program of the same user could change about the server from outside: its resource limits, CPU
    affinity, priority and scheduling policy (ptrace, /proc/<pid>/mem and the like are closed: not dumpable)."""
    names = sorted(n for n in dir(resource) if n.startswith("RLIMIT_"))
    return ([resource.getrlimit(getattr(resource, n)) for n in names], sorted(os.sched_getaffinity(0)),
            os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0))


def descendants():
    """Pids of every process below this one (from each /proc/<pid>/stat's parent pid)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, pp in parent.items() if pp in frontier and pid not in found}
        found |= frontier
    return found


def kill_leftovers(deadline):
    """Kill and reap every process the program left behind; True when none is left. We are the subreaper, so
    every one of them is our descendant: having no child at all means having none."""
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return True
        if time.monotonic() > deadline:
            return False
        for pid in descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)


def wipe(dfd):
    """Remove everything inside the folder open as `dfd` (a program may have made its folders unreadable)."""
    for entry in list(os.scandir(dfd)):
        if entry.is_dir(follow_symlinks=False):
            os.chmod(entry.name, 0o700, dir_fd=dfd)
            sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                wipe(sub)
            finally:
                os.close(sub)
            os.rmdir(entry.name, dir_fd=dfd)
        else:
            os.unlink(entry.name, dir_fd=dfd)


def clean_up(work, before, libc, ipc):
    """None when the program left nothing behind (processes, files, IPC objects, changes to us), else what."""
    if not kill_leftovers(time.monotonic() + 3.0):
        return "processes left running"
    if ipc and not remove_ipc(libc):
        return "System V IPC objects left"
    for path, fd, mode in work:
        try:
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                return f"{path} was moved"
            os.fchmod(fd, mode)
            wipe(fd)
            if os.listdir(fd):
                return "files left"
        except (OSError, RecursionError) as e:
            return f"files left ({type(e).__name__})"
    if own_state() != before:
        return "the server's limits, affinity or priority were changed"
    return None


def main():
    proto_in = LineReader(os.dup(0))
    proto_out = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    cfg = json.loads(proto_in.readline())["serve"]
    exec(compile(HEADER, "<header>", "exec"), {})  # imported once here, inherited by every program's fork
    sys.setrecursionlimit(1000)  # the header's 50000 is for the programs
    libc = load_libc()
    reusable = libc is not None and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    if cfg.get("protect"):  # the programs' user may not ptrace us, read our memory or our file descriptors
        reusable = reusable and libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    work = []
    for path in cfg["workdirs"]:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        work.append((path, fd, os.fstat(fd).st_mode & 0o7777))
    before = own_state()
    send(proto_out, {"hello": True, "reusable": bool(reusable)})
    os.dup2(null, 2)  # nobody reads our stderr after the start
    while True:
        line = proto_in.readline()
        if not line.strip():
            return
        req = json.loads(line)
        if not isinstance(req.get("code"), str):
            return
        path, fd, _ = work[0]
        name = "run-" + os.urandom(6).hex()  # a fresh private working folder per program
        os.mkdir(name, 0o700, dir_fd=fd)
        home_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        pid = os.fork()
        if pid == 0:
            program(req, proto_in, proto_out, os.path.join(path, name), home_fd)
        os.close(home_fd)
        while os.waitpid(-1, 0)[0] != pid:  # reaping the program's orphans as they end
            pass
        why = clean_up(work, before, libc, cfg.get("ipc"))
        send(proto_out, {"done": True, "clean": why is None, "why": why})


if __name__ == "__main__":
    main()
