"""Runs model-written programs inside the sandbox: a server forks a launcher per program, which runs all of the
program's tests in one runner process.

sandbox_server.py starts this file's text as `python -I -S -c <text>` inside bubblewrap (or a setsid
subprocess) as the unprivileged user; it needs only the standard library. The server imports LiveCodeBench's
header once, then serves programs one at a time, each in a fresh fork of it (the program's launcher: its own
session, limits and random seed; the server never runs program code). The launcher compiles the program and
forks one runner, which sets the module up once and runs the tests one after another, as LiveCodeBench does:
a stdin/stdout program runs as a fresh `__main__` per test (its top-level imports done once, in the set-up); a
call-based program's module is executed and its `Solution()` made once, and the function called per test. The
launcher hands each test's stdin, stdout, stderr and result files to the runner over a socket, times the test,
kills a late runner; after a failure a further test gets a fresh runner. After each program the server kills
every process the program left (it is their subreaper), empties the writable folders and checks that its own
limits, CPU affinity and priority are as they were (bwrap mode: also removes the System V IPC objects of its
namespace); the grader discards a server that says otherwise. Protocol, one JSON object per line:

  server  in:  {"serve": {"workdirs": [path, ...], "protect": bool, "ipc": bool, "path": [folder, ...]}}
                                                                           out: {"hello": true, "reusable": bool}
  program in:  {"code", "kind": "stdio"|"call", "fn_name", "timeout", "cpu", "memory", "nproc", "fsize",
                "nofile"}                                                 out: {"ready": true} | {"compile_error"}
  test    in:  {"input": str}        out: {"status": "ok"|"timeout"|"runtime_error"|"memory_limit", "err": str,
                                           "time": s, "size": n}, then n bytes: the output (stdio: stdout;
                                           call: "v" and the returned value's JSON, or "r" and its repr)
  end     in:  {"end": true}         out: {"done": true, "clean": bool, "why": str|null}

Everything here runs as the program's own user: nothing it reports is trusted to decide a pass. The outputs
are compared outside the sandbox with the expected outputs, which never enter it; a hostile program can
only make its own tests fail.
"""

import ast
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback

# LiveCodeBench prepends these imports to every program (lcb_runner/evaluation/testing_util.py)
HEADER = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\n"
    "from statistics import *\nfrom itertools import *\nfrom functools import *\nfrom operator import *\n"
    "from io import *\nfrom sys import *\nfrom json import *\nfrom builtins import *\nfrom typing import *\n"
    "import string\nimport re\nimport datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\n"
    "import math\nimport random\nimport statistics\nimport itertools\nimport functools\nimport operator\n"
    "import io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n")
HEADER_CODE = compile(HEADER, "<header>", "exec")
INT_DIGITS = 50000  # LiveCodeBench's int-to-str limit (sys.set_int_max_str_digits)
MEMORY_EXIT = 86  # the runner's exit status for a MemoryError
ERR_TAIL = 2000  # characters of stderr kept
VERDICTS = ("ok", "runtime_error", "memory_limit")  # what a runner reports for a finished test
# the runner's standard streams as CPython makes them here (encoding, errors; newline "\n": no translation)
STDIO = {"in": (sys.stdin.encoding, sys.stdin.errors), "out": (sys.stdout.encoding, sys.stdout.errors),
         "err": (sys.stderr.encoding, sys.stderr.errors)}


def send(fd, obj, data=b""):
    data = (json.dumps(obj) + "\n").encode("utf-8") + data
    while data:
        data = data[os.write(fd, data):]


def limit(which, value):
    if value is not None:
        resource.setrlimit(which, (value, value))


# ---------------------------------------------------------------------------------------- the runner

def plain(v, top=True):
    """v as JSON-able data when Python's == would compare it with a JSON value like LiveCodeBench does, else
    raise TypeError (LiveCodeBench turns only a top-level tuple into a list; a numpy scalar counts as its
    value, as numpy's == makes it)."""
    if type(v).__module__ == "numpy" and hasattr(v, "item"):
        v = v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list) or (top and isinstance(v, tuple)):
        return [plain(x, False) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: plain(x, False) for k, x in v.items()}
    raise TypeError(f"a {type(v).__name__} is not plain JSON data")


def encoded(result, dumps=json.dumps):
    """The result memory file's bytes: "v" and the value's JSON, or "r" and its repr (the grader shows it)."""
    try:
        return b"v" + dumps(plain(result)).encode("ascii")
    except BaseException:  # not plain data, too deep, an int past the digit limit, an odd object's own error
        try:
            text = repr(result)[:1000]
        except BaseException as e:
            text = f"<a {type(result).__name__} that cannot be shown: {type(e).__name__}>"
        return b"r" + text.encode("utf-8", "backslashreplace")


def streams(fds):
    """Put a test's stdin, stdout and stderr on fds 0-2 and make sys.stdin/stdout/stderr for them as CPython
    makes its own (no newline translation: "abc\\r\\n" reads as "abc\\r\\n"); returns (stdout, stderr)."""
    for target, fd in zip((0, 1, 2), fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    (ie, ir), (oe, orr), (ee, er) = STDIO["in"], STDIO["out"], STDIO["err"]
    sys.stdin = sys.__stdin__ = open(0, encoding=ie, errors=ir, newline="\n", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding=oe, errors=orr, newline="\n", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding=ee, errors=er, newline="\n", closefd=False)
    return sys.stdout, sys.stderr


def cpu_budget(seconds):
    """The CPU-time limit: `seconds` more than the runner has used so far (its earlier tests included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(ru.ru_utime + ru.ru_stime) + 1 + seconds
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass


def attempt(err, fn, *args):
    """Run fn(*args); its verdict ("ok", "runtime_error" with the traceback on `err`, "memory_limit")."""
    try:
        fn(*args)
        return "ok"
    except MemoryError:
        return "memory_limit"
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # the launcher's own frames
            tb = tb.tb_next
        try:
            traceback.print_exception(type(e), e, tb or e.__traceback__, file=err)
        except BaseException:
            pass
        return "runtime_error"


def finish(out, err, wait_threads):
    """What the interpreter does when a program ends: wait for its non-daemon threads, flush its streams."""
    threading = sys.modules.get("threading")
    if wait_threads and threading is not None:
        try:
            main = threading.main_thread()
            for t in threading.enumerate():
                if t is not main and not t.daemon:
                    t.join()
        except BaseException:
            pass
    for s in {id(x): x for x in (sys.stdout, sys.stderr, out, err)}.values():
        try:
            s.flush()
        except BaseException:
            pass


def call_test(fn, text, res_fd, loads, write):
    """One call-based test: the arguments are one JSON value per line (LiveCodeBench's json.loads)."""
    data = encoded(fn(*[loads(line) for line in text.split("\n")]))
    while data:
        data = data[write(res_fd, data):]


def stdio_test(code, scope):
    """One stdin/stdout test: the program as a fresh __main__."""
    try:
        exec(code, scope)
    except SystemExit:
        pass  # LiveCodeBench counts exit() as a normal end


def runner(req, codes, sock, setup_fds):
    """The forked runner of one program: the module set-up once, then each test the launcher hands over, one
    message per test back ("ok", "runtime_error", "memory_limit"; the first message says how the set-up went).
    Never returns."""
    try:
        os.setpgid(0, 0)
        out, err = streams(setup_fds)
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 16)
        write, loads, recv_fds, read = os.write, json.loads, socket.recv_fds, os.read
        cpu = req["cpu"]
        cpu_budget(cpu)
        call, (code, imports) = req["kind"] == "call", codes
        base = {"__name__": "__main__", "__builtins__": __builtins__}
        target = {}

        def set_up():
            exec(HEADER_CODE, base)
            if not call:
                exec(imports, dict(base))  # the program's top-level imports, as LiveCodeBench hoists them
                return
            exec(code, base)
            owner = base["Solution"]() if "class Solution" in req["code"] else None
            target["fn"] = getattr(owner, req["fn_name"]) if owner is not None else base[req["fn_name"]]

        status = attempt(err, set_up)
        finish(out, err, False)
        write(keep, status.encode() if status != "ok" else b"ready")
        while status == "ok":
            msg, fds, _, _ = recv_fds(sock, 16, 4)
            if not msg or len(fds) != 4:
                break
            *io_fds, res_fd = fds
            if call:  # the arguments, read before the program may touch fd 0
                chunks = []
                while chunk := read(io_fds[0], 1 << 20):
                    chunks.append(chunk)
                text = b"".join(chunks).decode("utf-8", "surrogatepass")
            out, err = streams(io_fds)
            cpu_budget(cpu)
            scope = dict(base)
            if call:
                status = attempt(err, call_test, target["fn"], text, res_fd, loads, write)
            else:
                status = attempt(err, stdio_test, code, scope)
            finish(out, err, not call)
            scope.clear()
            os.close(res_fd)
            write(keep, status.encode())
        os._exit(0)
    except MemoryError:
        os._exit(MEMORY_EXIT)
    except BaseException:
        os._exit(1)


# ---------------------------------------------------------------------------------------- the launcher

def memfd(name, data=b""):
    fd = os.memfd_create(name, 0)
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_fd(fd, cap):
    """Up to `cap` bytes of a memory file, from its start."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, n = [], 0
    while n < cap:
        b = os.read(fd, min(1 << 20, cap - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


class Runner:
    """The launcher's handle on one runner process: start, hand a test over, wait for its report, kill."""

    def __init__(self, req, codes):
        self.req = req
        self.setup_fds = [memfd("setup-stdin"), memfd("setup-stdout"), memfd("setup-stderr")]
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        self.started = time.monotonic()
        self.pid = os.fork()
        if self.pid == 0:
            self.sock.close()
            runner(req, codes, theirs, self.setup_fds)
        theirs.close()
        self.pidfd = None
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pass
        self.exit = None  # the wait status once it ended

    def report(self, deadline):
        """The runner's next message, ("exit", wait status) when it ended first, or ("late", None)."""
        while self.exit is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return "late", None
            watch = [self.sock] + ([self.pidfd] if self.pidfd is not None else [])
            ready = select.select(watch, [], [], left if self.pidfd is not None else min(left, 0.002))[0]
            if self.sock in ready:
                try:
                    msg = self.sock.recv(64)
                except OSError:
                    msg = b""
                if msg:
                    return "msg", msg.decode("ascii", "replace")
                if self.pidfd is None:  # its end closed (it ended, or the program closed it): wait for the end
                    time.sleep(min(max(left, 0), 0.002))
                else:
                    select.select([self.pidfd], [], [], max(deadline - time.monotonic(), 0))
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.exit = status
        return "exit", self.exit

    def kill(self):
        if self.exit is None:
            for kill in (os.killpg, os.kill):
                try:
                    kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            self.exit = os.waitpid(self.pid, 0)[1]
        for fd in self.setup_fds + ([self.pidfd] if self.pidfd is not None else []):
            os.close(fd)
        self.setup_fds, self.pidfd = [], None
        self.sock.close()


def verdict(what, value, call):
    """(status, note) of a runner's report: a message, how it ended, or late."""
    if what == "msg":
        return (value, "") if value in VERDICTS else ("runtime_error", "the program garbled its runner's report")
    if what == "late":
        return "timeout", ""
    if os.WIFSIGNALED(value):
        sig = os.WTERMSIG(value)
        state = "timeout" if sig in (signal.SIGXCPU, signal.SIGKILL) else "runtime_error"
        return state, f"killed by signal {signal.Signals(sig).name}"
    code = os.WEXITSTATUS(value)
    if code == MEMORY_EXIT:
        return "memory_limit", ""
    if code == 0 and not call:
        return "ok", ""  # a program that ended its process itself (os._exit(0)): its output so far is its answer
    return "runtime_error", f"the program ended its process (exit status {code})"


def run_test(req, codes, state, test):
    """One test on the program's runner (started first when there is none): (answer, output bytes)."""
    call, timeout = req["kind"] == "call", float(req["timeout"])
    if state.get("runner") is None:
        state["runner"] = Runner(req, codes)
    run = state["runner"]
    if not state.get("set"):  # the set-up's own time limit, as LiveCodeBench gives the module's execution
        what, value = run.report(run.started + timeout)
        if (what, value) != ("msg", "ready"):
            status, note = verdict(what, value, True)
            if status == "ok":
                status = "runtime_error"
            err = "while setting up the program: " + (read_fd(run.setup_fds[2], 1 << 16).decode("utf-8", "replace")
                                                      + "\n" + note).strip()[-ERR_TAIL:]
            run.kill()
            state.clear()
            return {"status": status, "err": err, "time": round(time.monotonic() - run.started, 4), "size": 0}, b""
        state["set"] = True
    data = test["input"].encode("utf-8", "surrogatepass")
    fds = [memfd("stdin", data), memfd("stdout"), memfd("stderr"), memfd("result")]
    start = time.monotonic()
    try:
        gave = socket.send_fds(run.sock, [b"t"], fds) > 0
    except OSError:
        gave = False
    what, value = run.report(start + timeout)
    if not gave and what == "msg":  # a report with no test handed over
        value = "?"
    elapsed = time.monotonic() - start
    status, note = verdict(what, value, call)
    if what == "late":
        run.kill()
    out = read_fd(fds[3] if call else fds[1], int(req["fsize"]))
    err = (read_fd(fds[2], 1 << 16).decode("utf-8", "replace") + "\n" + note).strip()[-ERR_TAIL:]
    for fd in fds:
        os.close(fd)
    if status != "ok" or what == "exit":
        run.kill()
        state.clear()
    return {"status": status, "err": err, "time": round(elapsed, 4), "size": len(out)}, out


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
    """The forked launcher of one program: its own session, working folder and limits; one runner for its
    tests. Never returns."""
    state = {}
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
        try:  # the program's code, and (stdio) its top-level imports' for the set-up
            tree = ast.parse(req["code"], "<solution>")
            imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
            codes = (compile(tree, "<solution>", "exec"), compile(imports, "<solution>", "exec"))
        except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
            codes = None
            send(proto_out, {"compile_error": f"{type(e).__name__}: {e}"[:ERR_TAIL]})
        if codes is not None:
            send(proto_out, {"ready": True})
        while True:
            line = proto_in.readline()
            if not line.strip():
                break
            test = json.loads(line)
            if "end" in test or codes is None:
                break
            send(proto_out, *run_test(req, codes, state, test))
    finally:
        if state.get("runner") is not None:
            state["runner"].kill()
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
    sys.path[:0] = [p for p in cfg.get("path", []) if isinstance(p, str)]  # the third-party modules offered
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(INT_DIGITS)
    exec(HEADER_CODE, {})  # imported once here, inherited by every program's fork
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
