"""Sandbox servers: pre-started launchers (header imported) that run programs one at a time, and the pool lending them.

A server is one sandbox (a bwrap sandbox or a setsid subprocess, as an unprivileged uid of its own when we are
root) running _sandbox_launcher.py's text. It serves one program at a time: each program is a fresh fork of it
with its own session, limits and working folder, and after each program the server kills what the program
left, empties the writable folders and checks its own limits; the pool lends a server again only when all of
that came back clean. Programs of one worker thus share, one after another and never at once, the server's
namespaces and uid; docs/livecodebench.md ("Sandbox servers") says what that does and does not share.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..errors import StepscopeError

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
STARTUP_TIMEOUT = 30.0  # seconds for a server to start (and for a program to compile)
CLEANUP_TIMEOUT = 6.0  # seconds for a server to clean up after a program (it gives up on leftovers after 3)
UID_ENV = "STEPSCOPE_SANDBOX_UID"  # the first uid programs run as when we are root (default 65534)
MARKER_ENV = "STEPSCOPE_SANDBOX"
REAP_WAIT = 3.0  # seconds to wait for killed leftovers (setsid mode) to be gone
MAX_SERVED = 500  # programs one server runs before it is replaced (bounds whatever one server carries)


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


def interpreter() -> tuple[str, str | None]:
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


def bwrap_args(python: str, prefix: str | None, fsize_mb: int, env: dict[str, str],
               binds: list[str] | tuple[str, ...] = ()) -> list[str]:
    """bwrap's command line up to `--`: new namespaces, the system read-only, and two private tmpfs (/tmp, the
    working folder, and /dev/shm) as the only writable places; `binds`: further bwrap arguments (read-only
    binds of the offered modules)."""
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
    size = str(fsize_mb << 20)
    args += list(binds)
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
             "--remount-ro", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--size", size, "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return args + ["--"]


def sandbox_env(home: str, marker: str | None) -> dict[str, str]:
    """The programs' whole environment: nothing of ours."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home, "TMPDIR": home,
           "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
           # one thread per numerical library, as LiveCodeBench sets OMP_NUM_THREADS=1
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if marker:
        env[MARKER_ENV] = marker
    return env


# ------------------------------------------------------------------------------------ offered modules

OFFERED = ("numpy", "scipy", "networkx")  # the third-party modules of LiveCodeBench's environment
SITE_IN_SANDBOX = "/opt/stepscope-site"  # where bwrap mode shows them, read-only
_SITE_LOCK = threading.Lock()
_SITES: dict[str, dict[str, str]] = {}  # sandbox python -> {folder name: real folder}
_FARM: list[str] = []  # setsid mode: the folder of links to them (made once per process)


def _same_python(python: str) -> bool:
    """Whether `python` (the sandbox's interpreter) is of our Python version, so our compiled packages load."""
    if python == os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable):
        return True
    try:
        out = subprocess.run([python, "-I", "-S", "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return out == [str(sys.version_info[0]), str(sys.version_info[1])]


def offered_packages(python: str) -> dict[str, str]:
    """Folder name -> real folder of each OFFERED package installed here, with the shared-library folder its
    wheel carries (numpy.libs, scipy.libs); {} when the sandbox's interpreter is of another Python version."""
    import importlib.util

    with _SITE_LOCK:
        if python in _SITES:
            return _SITES[python]
    found: dict[str, str] = {}
    if _same_python(python):
        for name in OFFERED:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None or not spec.submodule_search_locations:
                continue
            folder = Path(next(iter(spec.submodule_search_locations))).resolve()
            found[name] = str(folder)
            libs = folder.parent / f"{name}.libs"
            if libs.is_dir():
                found[libs.name] = str(libs.resolve())
    with _SITE_LOCK:
        return _SITES.setdefault(python, found)


def offered_site(mode: str, python: str) -> tuple[list[str], list[str]]:
    """(bwrap arguments that bind the offered packages read-only, the folders the launcher puts on sys.path)."""
    found = offered_packages(python)
    if not found:
        return [], []
    if mode == "bwrap":
        binds = [a for name, real in found.items() for a in ("--ro-bind", real, f"{SITE_IN_SANDBOX}/{name}")]
        return binds, [SITE_IN_SANDBOX]
    with _SITE_LOCK:
        if not _FARM:
            farm = tempfile.mkdtemp(prefix="stepscope-site-")
            for name, real in found.items():
                os.symlink(real, os.path.join(farm, name))
            os.chmod(farm, 0o755)  # the programs' user (nobody, when we are root) reads it
            atexit.register(shutil.rmtree, farm, ignore_errors=True)
            _FARM.append(farm)
        return [], [_FARM[0]]


def kill_marked(marker: str) -> int:
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


class _Spawner:
    """Starts the servers from one long-lived thread: bwrap's --die-with-parent fires when the *thread* that
    started it ends, and the grader's worker threads come and go while the servers stay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stepscope-sandbox-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._queue.put((cmd, kwargs, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            cmd, kwargs, done = self._queue.get()
            try:
                done.set_result(subprocess.Popen(cmd, **kwargs))
            except BaseException as e:  # handed to the caller
                done.set_exception(e)


_SPAWNER = _Spawner()


# ---------------------------------------------------------------------------------------------- a server

class SandboxServer:
    """One sandbox running the launcher's server: `send`/`recv` JSON lines with deadlines, `finish()` after a
    program (True when it cleaned up and may serve another), `kill()` to end it and everything in it."""

    def __init__(self, mode: str, fsize_mb: int) -> None:
        self.mode, self.fsize_mb = mode, fsize_mb
        self.id = secrets.token_hex(6)
        self.served = 0  # programs started on this server
        self.reusable = False
        self.proc: subprocess.Popen | None = None
        self.slot: int | None = _take_slot()
        self.workdir: str | None = None
        self.marker: str | None = None
        self._buf = bytearray()
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.kill()
            raise

    def _start(self) -> None:
        root = os.geteuid() == 0
        uid = int(os.environ.get(UID_ENV, "65534")) - self.slot if root else None
        python, py_prefix = interpreter()
        launcher = [python, "-I", "-S", "-c", LAUNCHER.read_text(encoding="utf-8")]
        setpriv = shutil.which("setpriv")
        prefix: list[str] = []
        if setpriv:
            prefix = [setpriv, "--no-new-privs"]
            if uid is not None:
                prefix += [f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all"]
        elif root:
            raise StepscopeError("running model-written code as root needs setpriv (util-linux) to drop to an "
                                 "unprivileged user")
        binds, site = offered_site(self.mode, python)
        if self.mode == "bwrap":
            env = sandbox_env("/tmp", None)
            cmd = prefix + bwrap_args(python, py_prefix, self.fsize_mb, env, binds) + launcher
            cwd, workdirs = "/", ["/tmp", "/dev/shm"]  # the sandbox's only writable places
        else:
            self.workdir = tempfile.mkdtemp(prefix="stepscope-code-")
            if uid is not None:
                os.chown(self.workdir, uid, uid)
            self.marker = secrets.token_hex(12)
            env = sandbox_env(self.workdir, self.marker)
            cmd, cwd, workdirs = prefix + launcher, self.workdir, [self.workdir]
        self.proc = _SPAWNER.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   cwd=cwd, env=env, start_new_session=True, close_fds=True)
        for f in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(f.fileno(), False)
        # protect: the programs' user is not ours (root) or the sandbox is a namespace of its own (bwrap)
        cfg = {"serve": {"workdirs": workdirs, "protect": root or self.mode == "bwrap", "ipc": self.mode == "bwrap",
                         "path": site}}
        deadline = time.monotonic() + STARTUP_TIMEOUT
        hello = self.recv(deadline, 1 << 16) if self.send(cfg, deadline) else None
        if hello is None or not hello.get("hello"):
            raise StepscopeError(f"the {self.mode} sandbox did not start: {self._stderr_line()}")
        self.reusable = bool(hello.get("reusable"))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start_program(self, request: dict, deadline: float) -> dict | None:
        """Hand the server one program (code, kind, limits); its first answer (ready or compile_error) or None."""
        self.served += 1
        return self.recv(deadline, 1 << 20) if self.send(request, deadline) else None

    def finish(self) -> bool:
        """End the current program; True when the server reports that it left nothing behind."""
        deadline = time.monotonic() + CLEANUP_TIMEOUT
        done = self.recv(deadline, 1 << 16) if self.send({"end": True}, deadline) else None
        return done is not None and done.get("done") is True and done.get("clean") is True

    def stop(self) -> None:
        """End an idle server: it exits when its input ends (and is reaped, its CPU time handed up to us in
        setsid mode), then kill() as always."""
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
                self.proc.wait(timeout=2)
        self.kill()

    def kill(self) -> None:
        """Kill the server's processes (all of them), reap them and remove its working folder."""
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
            kill_marked(self.marker)
            self.marker = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self.slot is not None:
            _give_slot(self.slot)
            self.slot = None

    def disown(self) -> None:
        """Forget the server without touching it (in a forked child of ours: it is the parent's to use and kill)."""
        self.proc = self.marker = self.workdir = self.slot = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()

    # -- the pipes, with deadlines (a stopped or flooding program never blocks us)

    def send(self, obj: dict, deadline: float) -> bool:
        if self.proc is None:
            return False
        data = memoryview((json.dumps(obj) + "\n").encode("utf-8"))
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

    def recv(self, deadline: float, cap: int) -> dict | None:
        if self.proc is None:
            return None
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

    def recv_bytes(self, n: int, deadline: float, take: Callable[[bytes], object]) -> bool:
        """Hand the next `n` raw bytes to `take` as they arrive; False when they do not all come in time."""
        if self.proc is None:
            return False
        fd = self.proc.stdout.fileno()
        while n > 0:
            if not self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not select.select([fd], [], [], left)[0]:
                    continue
                try:
                    chunk = os.read(fd, min(n, 1 << 20))
                except BlockingIOError:
                    continue
                except OSError:
                    return False
                if not chunk:
                    return False
                self._buf += chunk
            piece = bytes(self._buf[:n])
            del self._buf[:n]
            n -= len(piece)
            take(piece)
        return True

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


# ------------------------------------------------------------------------------------------------ the pool

class ServerPool:
    """Idle servers by (mode, tmpfs size): `acquire` lends one (or starts one), `release` takes it back when its
    program ended clean, else kills it. A server serves one program at a time, so concurrent programs always
    run on different servers (different uids when we are root)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[SandboxServer]] = {}

    def acquire(self, mode: str, fsize_mb: int, *, reuse: bool = True) -> SandboxServer:
        while reuse:
            with self._lock:
                idle = self._idle.get((mode, fsize_mb))
                server = idle.pop() if idle else None
            if server is None:
                break
            if server.alive:
                return server
            server.kill()  # died while idle
        return SandboxServer(mode, fsize_mb)

    def release(self, server: SandboxServer, *, clean: bool, reuse: bool = True) -> None:
        if clean and reuse and server.reusable and server.alive and server.served < MAX_SERVED:
            with self._lock:
                self._idle.setdefault((server.mode, server.fsize_mb), []).append(server)
        else:
            server.kill()

    def close(self) -> None:
        """Stop every idle server."""
        with self._lock:
            servers = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in servers:
            s.stop()

    def forget(self) -> None:
        """Empty the pool without killing anything (in a forked child of ours)."""
        self._lock = threading.Lock()
        self._idle = {}


_LIVE: weakref.WeakSet[SandboxServer] = weakref.WeakSet()
POOL = ServerPool()
atexit.register(POOL.close)


def _after_fork_in_child() -> None:
    """A forked child of ours (a data loader, a multiprocessing worker) must neither use nor kill our servers."""
    global _SPAWNER, _SLOT_LOCK
    for s in list(_LIVE):
        s.disown()
    POOL.forget()
    _SPAWNER = _Spawner()
    _SLOT_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def close_servers() -> None:
    """Stop every idle sandbox server of this process (they also end with it)."""
    POOL.close()
