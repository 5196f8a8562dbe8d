"""Runs a model-written program on test inputs in a sandbox: bubblewrap when present, else a setsid subprocess.

Each program runs in processes of its own, never in ours: `python -I -S` running _sandbox_launcher.py's text,
which sets the resource limits and forks one child per test (docs/livecodebench.md has the whole story).

- bwrap mode (`bwrap` on PATH): new user, PID, network, IPC and UTS namespaces (no network at all, not even
  loopback; no other process visible), the system folders read-only, a private size-limited tmpfs as the
  working folder, a minimal environment, `--die-with-parent`, `--new-session`, no capabilities.
- setsid mode (no bwrap; a one-time warning): a subprocess in a new session, with the same limits, user and
  environment, in a private temporary working folder. It does NOT stop network access or reading files the
  user may read, and a program that leaves its session can only be found by the marker in its environment.
- Both: limits on CPU time and wall time per test, address space, processes, file size and open files;
  `no_new_privs`; when we run as root, the program runs as an unprivileged uid (65534, "nobody", minus the
  worker slot, so that concurrent programs neither share a process limit nor can signal each other); after
  the program, its whole process group (and in setsid mode every process carrying its marker) is killed.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import StepscopeError

MODES = ("auto", "bwrap", "setsid")
LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
STARTUP_TIMEOUT = 30.0  # seconds for the sandbox to start and compile the program
GRACE = 3.0  # seconds past the launcher's own per-test deadline before we kill everything
UID_ENV = "STEPSCOPE_SANDBOX_UID"  # the first uid programs run as when we are root (default 65534)
MARKER_ENV = "STEPSCOPE_SANDBOX"
REAP_WAIT = 3.0  # seconds to wait for killed leftovers (setsid mode) to be gone


@dataclass(frozen=True)
class Limits:
    """Per-test resource limits of a sandboxed program."""

    timeout: float = 6.0  # wall seconds per test; CPU seconds: the same, rounded up
    memory_mb: int = 4096  # address space
    nproc: int = 64  # processes of the program's user (root ignores it: programs never run as root)
    fsize_mb: int = 64  # largest file written (also the tmpfs size in bwrap mode)
    nofile: int = 64  # open files

    def __post_init__(self) -> None:
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise StepscopeError(f"--code-timeout must be a positive number of seconds, got {self.timeout}")
        if self.memory_mb < 64:
            raise StepscopeError(f"--code-memory must be at least 64 (MiB), got {self.memory_mb}")


@dataclass(frozen=True)
class TestRun:
    """What the launcher reported for one test: status ok/timeout/runtime_error/memory_limit and the output."""

    status: str
    out: str
    err: str
    time: float
    truncated: bool = False


# ------------------------------------------------------------------------------------------------ mode

_MODE_LOCK = threading.Lock()
_CHECKED: dict[str, str | None] = {}  # mode -> None when it works, else why not
_WARNED = False


def bwrap_available() -> bool:
    """Whether bubblewrap is installed and can create its namespaces here (checked once per process)."""
    return shutil.which("bwrap") is not None and _check("bwrap") is None


def resolve_mode(mode: str = "auto") -> str:
    """"bwrap" or "setsid": `auto` takes bwrap when it works (else warns once and takes setsid)."""
    global _WARNED
    if mode not in MODES:
        raise StepscopeError(f"unknown sandbox mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "setsid":
        return mode
    if shutil.which("bwrap") is None:
        if mode == "bwrap":
            raise StepscopeError("sandbox mode bwrap: bubblewrap is not installed (Debian/Ubuntu: apt-get install "
                                 "bubblewrap)")
        why = "bubblewrap is not installed (apt-get install bubblewrap)"
    else:
        why = _check("bwrap")
        if why is not None and mode == "bwrap":
            raise StepscopeError(f"sandbox mode bwrap does not work here: {why}")
    if why is None:
        return "bwrap"
    with _MODE_LOCK:
        if not _WARNED:
            _WARNED = True
            warnings.warn(f"model-written code runs without bubblewrap ({why}): in a plain setsid subprocess with "
                          f"resource limits, which does not block network access or reading your files",
                          RuntimeWarning, stacklevel=2)
    return "setsid"


def _check(mode: str) -> str | None:
    """None when a trivial program runs in `mode`, else the reason it does not (cached per process)."""
    with _MODE_LOCK:
        if mode in _CHECKED:
            return _CHECKED[mode]
    why = None
    try:
        with SandboxedProgram("print(1)", mode=mode, limits=Limits(timeout=10.0), _checked=True) as prog:
            r = prog.run("", cap=100)
            if r is None or r.status != "ok" or r.out.strip() != "1":
                why = f"a trivial program did not run ({r.status if r else 'no answer'}: {r.err if r else ''})"
    except StepscopeError as e:
        why = str(e)
    with _MODE_LOCK:
        _CHECKED[mode] = why
    return why


# ------------------------------------------------------------------------------------------- processes

_SLOT_LOCK = threading.Lock()
_SLOTS_USED: set[int] = set()


def _take_slot() -> int:
    with _SLOT_LOCK:
        slot = next(i for i in range(len(_SLOTS_USED) + 1) if i not in _SLOTS_USED)
        _SLOTS_USED.add(slot)
        return slot


def _give_slot(slot: int) -> None:
    with _SLOT_LOCK:
        _SLOTS_USED.discard(slot)


def _world_reachable(path: str) -> bool:
    """Whether every folder above `path` lets any user through (the programs' user is not us)."""
    p = Path(path)
    return all(os.stat(d).st_mode & 0o001 for d in p.parents)


def _interpreter() -> tuple[str, str | None]:
    """(python, its prefix to bind read-only or None): our base interpreter (not a venv's, so programs see only
    the standard library), or the system's /usr/bin/python3 when we are root and the unprivileged user cannot
    reach ours (a pyenv under /root)."""
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if os.geteuid() == 0 and not _world_reachable(python):
        system = os.path.realpath("/usr/bin/python3")
        if not os.path.exists(system):
            raise StepscopeError(f"the programs' unprivileged user cannot reach {python} and there is no "
                                 f"/usr/bin/python3")
        return system, None
    return python, (None if prefix == "/usr" or prefix.startswith("/usr/") else prefix)


def _launcher_source() -> str:
    return LAUNCHER.read_text(encoding="utf-8")


def _bwrap_args(python: str, prefix: str | None, limits: Limits, env: dict[str, str]) -> list[str]:
    args = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    if prefix is not None:
        args += ["--ro-bind", prefix, prefix]
    if not python.startswith("/usr/") and not (prefix and python.startswith(prefix + "/")):
        args += ["--ro-bind", python, python]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
             "--size", str(limits.fsize_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return args + ["--"]


def _env(home: str, marker: str | None) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home,
           "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if marker:
        env[MARKER_ENV] = marker
    return env


def _kill_marked(marker: str) -> int:
    """Stop, then kill, every process whose environment carries `marker` (setsid mode); returns how many are
    still not reaped after REAP_WAIT seconds."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found: set[int] = set()
    for _ in range(20):  # a process may fork while we scan: stop what we find and look again
        new = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if needle not in f.read():
                        continue
            except OSError:
                continue
            pid = int(entry.name)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
            found.add(pid)
            new += 1
        if not new:
            break
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    # wait (a little) until init has reaped them: until then they still count against the user's process limit
    deadline = time.monotonic() + REAP_WAIT
    while found and time.monotonic() < deadline:
        found = {pid for pid in found if os.path.exists(f"/proc/{pid}")}
        if found:
            time.sleep(0.005)
    return len(found)


class SandboxedProgram:
    """One program in its own sandbox: `run(input)` runs it on one test; `close()` (or the with block's end)
    kills everything it started and removes its working folder.

    kind "stdio": the program reads the input on stdin and its stdout is the output. kind "call": the input is
    one JSON value per line, the arguments of `Solution().<fn_name>(...)` (or of a top-level function
    `fn_name` when the code has no class Solution); the output is the JSON of the returned value.
    """

    def __init__(self, code: str, *, kind: str = "stdio", fn_name: str | None = None, limits: Limits | None = None,
                 mode: str = "auto", _checked: bool = False) -> None:
        if kind not in ("stdio", "call"):
            raise StepscopeError(f"unknown program kind {kind!r}; use stdio or call")
        if kind == "call" and not fn_name:
            raise StepscopeError("a call-based program needs the name of the function to call (fn_name)")
        self.mode = mode if _checked else resolve_mode(mode)
        self.limits = limits or Limits()
        self.compile_error: str | None = None
        self.proc: subprocess.Popen | None = None
        self.slot = _take_slot()
        self.workdir: str | None = None
        self.marker: str | None = None
        self._buf = bytearray()
        try:
            self._start(code, kind, fn_name)
        except BaseException:
            self.close()
            raise

    # -- start and stop

    def _start(self, code: str, kind: str, fn_name: str | None) -> None:
        import json

        root = os.geteuid() == 0
        uid = int(os.environ.get(UID_ENV, "65534")) - self.slot if root else None
        python, py_prefix = _interpreter()
        launcher = [python, "-I", "-S", "-c", _launcher_source()]
        setpriv = shutil.which("setpriv")
        prefix: list[str] = []
        if setpriv:
            prefix = [setpriv, "--no-new-privs"]
            if uid is not None:
                prefix += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        elif root:
            raise StepscopeError("running model-written code as root needs setpriv (util-linux) to drop to an "
                                 "unprivileged user")
        if self.mode == "bwrap":
            cmd = prefix + _bwrap_args(python, py_prefix, self.limits, _env("/tmp", None)) + launcher
            cwd, env = "/", _env("/tmp", None)
        else:
            self.workdir = tempfile.mkdtemp(prefix="stepscope-code-")
            if uid is not None:
                os.chown(self.workdir, uid, uid)
            self.marker = secrets.token_hex(12)
            cmd = prefix + launcher
            cwd, env = self.workdir, _env(self.workdir, self.marker)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd, env=env, start_new_session=True, close_fds=True)
        for f in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(f.fileno(), False)
        lim = self.limits
        header = {"code": code, "kind": kind, "fn_name": fn_name, "timeout": lim.timeout,
                  "cpu": int(math.ceil(lim.timeout)), "memory": lim.memory_mb << 20, "nproc": lim.nproc,
                  "fsize": lim.fsize_mb << 20, "nofile": lim.nofile}
        deadline = time.monotonic() + STARTUP_TIMEOUT + lim.timeout
        first = None
        if self._send(json.dumps(header) + "\n", deadline):
            first = self._recv(deadline, 1 << 20)
        if first is None:
            raise StepscopeError(f"the {self.mode} sandbox did not start: {self._stderr_line()}")
        if "compile_error" in first:
            self.compile_error = str(first["compile_error"])
        elif not first.get("ready"):
            raise StepscopeError(f"the {self.mode} sandbox did not start: unexpected answer {str(first)[:100]}")

    def close(self) -> None:
        """Kill the program's processes (all of them), reap them and remove the working folder."""
        p, self.proc = self.proc, None
        if p is not None:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                with contextlib.suppress(Exception):
                    f.close()
        if self.marker is not None:
            _kill_marked(self.marker)
            self.marker = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self.slot is not None:
            _give_slot(self.slot)
            self.slot = None

    def __enter__(self) -> SandboxedProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- tests

    def run(self, test_input: str, *, cap: int = 1 << 20) -> TestRun | None:
        """Run the program on one input (its output cut at `cap` characters); None when the sandbox died or
        stopped answering (everything is then killed; later calls return None too)."""
        import json

        if self.proc is None or self.compile_error is not None:
            return None
        deadline = time.monotonic() + self.limits.timeout + GRACE
        line_cap = 8 * cap + (1 << 20)  # JSON may escape every character
        ans = None
        if self._send(json.dumps({"input": test_input, "cap": cap}) + "\n", deadline):
            ans = self._recv(deadline, line_cap)
        if ans is None or not isinstance(ans.get("status"), str):
            self.close()
            return None
        return TestRun(str(ans["status"]), str(ans.get("out", "")), str(ans.get("err", "")),
                       float(ans.get("time") or 0.0), bool(ans.get("truncated")))

    # -- the pipes, with deadlines (a stopped or flooding program never blocks us)

    def _send(self, text: str, deadline: float) -> bool:
        data = memoryview(text.encode("utf-8"))
        fd = self.proc.stdin.fileno()
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _, w, _ = select.select([], [fd], [], left)
            if not w:
                continue
            try:
                data = data[os.write(fd, data[:1 << 16]):]
            except BlockingIOError:
                continue
            except OSError:
                return False
        return True

    def _recv(self, deadline: float, cap: int) -> dict | None:
        import json

        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if len(self._buf) > cap:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not chunk:
                return None
            self._buf += chunk
        i = self._buf.index(b"\n")
        line = bytes(self._buf[:i])
        del self._buf[:i + 1]
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    def _stderr_line(self) -> str:
        p = self.proc
        if p is None:
            return "no process"
        with contextlib.suppress(Exception):
            p.kill()
            p.wait(timeout=5)
        text = ""
        with contextlib.suppress(Exception):
            os.set_blocking(p.stderr.fileno(), False)
            text = (p.stderr.read(4096) or b"").decode("utf-8", errors="replace")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else f"exit status {p.returncode}"
