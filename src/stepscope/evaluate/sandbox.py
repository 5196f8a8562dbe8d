"""Runs a model-written program on test inputs in a sandbox: bubblewrap when present, else a setsid subprocess.

Each program runs in processes of its own, never in ours: a fresh fork of a sandbox server (`python -I -S`
running _sandbox_launcher.py's text, LiveCodeBench's header already imported; sandbox_server.py), which sets
the resource limits and forks one runner for all of the program's tests (docs/livecodebench.md has the whole
story).

- bwrap mode (`bwrap` on PATH): new user, PID, network, IPC and UTS namespaces (no network at all, not even
  loopback; no other process visible), the system folders read-only, a private size-limited tmpfs as the
  working folder, a minimal environment, `--die-with-parent`, `--new-session`, no capabilities.
- setsid mode (no bwrap; a one-time warning): a subprocess in a new session, with the same limits, user and
  environment, in a private temporary working folder. It does NOT stop network access or reading files the
  user may read, and a program that leaves its session can only be found by the marker in its environment.
- Both: limits on CPU time and wall time per test, address space, processes, file size and open files;
  `no_new_privs`; when we run as root, the program runs as an unprivileged uid (65534, "nobody", minus the
  worker slot, so that concurrent programs neither share a process limit nor can signal each other); after
  the program, every process it started is killed (the server is their subreaper), its writable folders are
  emptied, and the server is lent to the next program of a worker only when all of that came back clean
  (`reuse=False`: a server of its own, killed with everything in it afterwards).
"""

from __future__ import annotations

import codecs
import contextlib
import math
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StepscopeError
from .sandbox_server import POOL, STARTUP_TIMEOUT, SandboxServer, close_servers

MODES = ("auto", "bwrap", "setsid")
GRACE = 3.0  # seconds past the launcher's own per-test deadline before we kill everything
TRANSFER = 30.0  # further seconds for a test's output to arrive (up to the file-size limit, 64 MiB)


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
            r = prog.run("")
            if r is None or r.status != "ok" or r.out.strip() != "1":
                why = f"a trivial program did not run ({r.status if r else 'no answer'}: {r.err if r else ''})"
    except StepscopeError as e:
        why = str(e)
    with _MODE_LOCK:
        _CHECKED[mode] = why
    return why


class SandboxedProgram:
    """One program in a sandbox of its own: `run(input)` runs it on one test; `close()` (or the with block's end)
    kills everything it started and empties its working folders.

    kind "stdio": the program reads the input on stdin and its stdout is the output. kind "call": the input is
    one JSON value per line, the arguments of `Solution().<fn_name>(...)` (or of a top-level function
    `fn_name` when the code has no class Solution); the output is the JSON of the returned value.
    `reuse` (default True): run as a fresh fork of an idle sandbox server of this process when there is one
    (docs/livecodebench.md, "Sandbox servers"); False: a server of its own, for this program only.
    `server_id` names the server, `served` how many programs it started before this one.
    """

    def __init__(self, code: str, *, kind: str = "stdio", fn_name: str | None = None, limits: Limits | None = None,
                 mode: str = "auto", reuse: bool = True, _checked: bool = False) -> None:
        if kind not in ("stdio", "call"):
            raise StepscopeError(f"unknown program kind {kind!r}; use stdio or call")
        if kind == "call" and not fn_name:
            raise StepscopeError("a call-based program needs the name of the function to call (fn_name)")
        self.mode = mode if _checked else resolve_mode(mode)
        self.limits = limits or Limits()
        self.reuse = reuse
        self.compile_error: str | None = None
        self._server: SandboxServer | None = None
        lim = self.limits
        header = {"code": code, "kind": kind, "fn_name": fn_name, "timeout": lim.timeout,
                  "cpu": int(math.ceil(lim.timeout)), "memory": lim.memory_mb << 20, "nproc": lim.nproc,
                  "fsize": lim.fsize_mb << 20, "nofile": lim.nofile}
        try:
            first = None
            for _ in range(2):  # an idle server may have died meanwhile: then once more on a fresh one
                server = self._server = POOL.acquire(self.mode, lim.fsize_mb, reuse=reuse)
                self.server_id, self.served = server.id, server.served
                first = server.start_program(header, time.monotonic() + STARTUP_TIMEOUT + lim.timeout)
                if first is not None or self.served == 0 or server.alive:
                    break
                self._discard()
            if first is None:
                raise StepscopeError(f"the {self.mode} sandbox did not start the program")
            if "compile_error" in first:
                self.compile_error = str(first["compile_error"])
            elif not first.get("ready"):
                raise StepscopeError(f"the {self.mode} sandbox did not start: unexpected answer {str(first)[:100]}")
        except BaseException:
            self._discard()
            raise

    def close(self) -> None:
        """End the program: its server cleans up and is lent again, or (anything amiss) is killed with
        everything in it."""
        server, self._server = self._server, None
        if server is not None:
            POOL.release(server, clean=server.finish(), reuse=self.reuse)

    def _discard(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.kill()

    def __enter__(self) -> SandboxedProgram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._discard()

    def run(self, test_input: str, *, sink: Callable[[str], None] | None = None) -> TestRun | None:
        """Run the program on one input; None when the sandbox died, stopped answering or answered nonsense
        (everything is then killed; later calls return None too).

        The output (stdout; for a call-based program "v" and the returned value's JSON, or "r" and its repr) is
        read whole, however long (the file-size limit bounds it), decoded as UTF-8 with invalid bytes replaced:
        into `TestRun.out`, or, with `sink`, handed to `sink` piece by piece as it arrives (`out` is then "")."""
        server = self._server
        if server is None or self.compile_error is not None:
            return None
        # the launcher's own deadlines: the set-up (the first test on a new runner), then the test
        deadline = time.monotonic() + 2 * self.limits.timeout + GRACE
        ans = server.recv(deadline, 1 << 20) if server.send({"input": test_input}, deadline) else None
        head = _answer(ans, self.limits.fsize_mb << 20)
        pieces: list[str] = []
        take = pieces.append if sink is None else sink
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if head is None or not server.recv_bytes(head[3], deadline + TRANSFER,
                                                 lambda b: take(decoder.decode(b))):
            self._discard()
            return None
        take(decoder.decode(b"", True))
        status, err, seconds, _ = head
        return TestRun(status, "".join(pieces), err, seconds)


STATUSES = ("ok", "timeout", "runtime_error", "memory_limit")


def _answer(ans: dict | None, most: int) -> tuple[str, str, float, int] | None:
    """(status, err, time, size) of a launcher's answer to a test, or None when it is not a well-formed one (the
    launcher runs as the program's user: nothing it says is trusted further than its shape)."""
    if not isinstance(ans, dict) or ans.get("status") not in STATUSES:
        return None
    size, seconds, err = ans.get("size"), ans.get("time"), ans.get("err", "")
    if type(size) is not int or not 0 <= size <= most or not isinstance(err, str):
        return None
    if type(seconds) not in (int, float) or not math.isfinite(seconds):
        return None
    return ans["status"], err, float(seconds), size


__all__ = ["GRACE", "MODES", "STATUSES", "Limits", "SandboxedProgram", "TestRun", "bwrap_available", "close_servers",
           "resolve_mode"]
