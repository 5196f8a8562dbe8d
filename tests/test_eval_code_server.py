"""Sandbox servers, in both modes: consecutive programs of one worker run as fresh forks of one server, and a
program cannot affect the next one: its leftover processes, files, IPC objects and changes to modules,
builtins and the environment are gone; a program that harms the server (kills it, lowers its limits, its
priority or its CPU affinity) gets it replaced; forked children of ours and ended worker threads leave the
servers alone. (The per-program hostile programs are in test_eval_code.py.)
"""

import json
import os
import secrets
import signal
import time
from pathlib import Path

import pytest
import test_eval_code as code_tests

from stepscope.evaluate.code_grading import grade_code_many
from stepscope.evaluate.sandbox import SandboxedProgram, close_servers

mode = code_tests.mode  # the bwrap/setsid fixture
_sleepers, answer = code_tests._sleepers, code_tests.answer
SHM_KEY, MSG_KEY = 0x5354, 0x5355
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

LEAVE = LIBC + """import builtins, json, math, os, random, time
home = os.getcwd()
shared = os.path.dirname(home)  # the server's working folder (bwrap: /tmp), emptied after each program
pid = os.fork()
if pid == 0:  # leaves the session and execs
    os.setsid()
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{token}'])
    os._exit(0)
os.waitpid(pid, 0)
sleeper = os.fork()
if sleeper == 0:  # leaves the session and stays a Python
    os.setsid()
    time.sleep(60)
    os._exit(0)
open('here.txt', 'w').write('x')
open(os.path.join(shared, 'left.txt'), 'w').write('x')
os.makedirs('locked/inner')
open('locked/inner/f', 'w').write('x')
os.chmod('locked/inner', 0)
os.chmod('locked', 0)
with open(os.path.join(shared, 'big'), 'wb') as f:
    f.write(b'0' * (40 << 20))  # 40 of the 64 MiB tmpfs (bwrap)
if {bwrap}:
    open('/dev/shm/left', 'w').write('x')
    shm, msg = libc.shmget({shm}, 4096, 0o1600), libc.msgget({msg}, 0o1600)
    assert shm >= 0 and msg >= 0
mq = libc.mq_open(b'/{token}', os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600, None)
builtins.len = lambda x: -1
math.pi = 3
json.dumps = lambda *a, **k: 'tampered'
os.environ['LEFT_BEHIND'] = '1'
print(home, sleeper, mq, random.random())
"""

CHECK = LIBC + """import json, math, os, random
home = os.getcwd()
shared = os.path.dirname(home)
out = {{"len": len("abc"), "pi": math.pi, "dumps": json.dumps([1]), "env": os.environ.get("LEFT_BEHIND"),
        "random": random.random(), "home": home, "shared": sorted(os.listdir(shared)), "here": os.listdir(home)}}
with open(os.path.join(shared, 'big2'), 'wb') as f:
    f.write(b'0' * (40 << 20))  # fits only if the first program's 40 MiB are gone
if {bwrap}:
    out["procs"] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    out["shm"] = os.listdir('/dev/shm')
    out["sysv"] = [libc.shmget({shm}, 0, 0), libc.msgget({msg}, 0)]
print(json.dumps(out))
"""


def _gone(pid: int, wait: float = 5.0) -> bool:
    """Whether process `pid` ends (is gone, or a zombie) within `wait` seconds."""
    def dead() -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat[stat.rindex(")") + 2] == "Z"

    deadline = time.monotonic() + wait
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dead()


def test_a_program_leaves_nothing_to_the_next(mode):
    token = f"{secrets.randbelow(10**6) + 10**6}.25"
    fill = dict(bwrap=mode == "bwrap", shm=SHM_KEY, msg=MSG_KEY)
    with SandboxedProgram(LEAVE.format(token=token, **fill), mode=mode) as p1:
        r1 = p1.run("")
    assert r1 is not None and r1.status == "ok", r1
    home1, sleeper, mq, rand1 = r1.out.split()
    assert int(mq) == -1  # no POSIX message queue can be made (they would outlive the program unseen)
    assert _sleepers(token) == [] or _gone(_sleepers(token)[0])  # the exec'd escapee is gone
    if mode == "setsid":  # pids are ours to see: the Python escapee is gone, and the first working folder
        assert _gone(int(sleeper)) and not Path(home1).exists()
    with SandboxedProgram(CHECK.format(**fill), mode=mode) as p2:
        r2 = p2.run("")
    assert p2.server_id == p1.server_id and p2.served == p1.served + 1  # the same server ran both
    assert r2 is not None and r2.status == "ok", r2
    out = json.loads(r2.out)
    assert out["len"] == 3 and out["pi"] == 3.141592653589793 and out["dumps"] == "[1]" and out["env"] is None
    assert out["random"] != float(rand1)  # a fresh random seed per program
    assert out["home"] != home1 and out["here"] == [] and out["shared"] == [os.path.basename(out["home"])]
    if mode == "bwrap":
        assert len(out["procs"]) == 4, out["procs"]  # bwrap's init, the server, the launcher and this test
        assert out["shm"] == [] and out["sysv"] == [-1, -1]


def _server_pid_of_program() -> str:
    """Code that sets `server`: the pid of the server as the program sees it (its parent's parent)."""
    return ("import os, resource, signal\n"
            "def parent(pid):\n    stat = open(f'/proc/{pid}/stat').read()\n"
            "    return int(stat[stat.rindex(')') + 2:].split()[1])\n"
            "server = parent(os.getppid())  # the test's parent is the program's launcher, its parent the server\n")


TAMPER = {"kill": "os.kill(server, signal.SIGKILL)",
          "limits": "resource.prlimit(server, resource.RLIMIT_NOFILE, (32, 32))",
          "nice": "os.setpriority(os.PRIO_PROCESS, server, 19)",
          "affinity": "os.sched_setaffinity(server, {min(os.sched_getaffinity(0))})"}


@pytest.mark.parametrize("harm", sorted(TAMPER))
def test_a_harmed_server_is_replaced(mode, harm):
    if harm == "affinity" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the affinity cannot be narrowed")
    close_servers()  # no idle server: the second program runs on the first one's server or on a new one
    with SandboxedProgram(_server_pid_of_program() + TAMPER[harm] + "\nprint('done')", mode=mode) as p1:
        r1 = p1.run("")
    if harm != "kill":
        assert r1 is not None and r1.out == "done\n", r1  # the harm was done (as the same user, it may)
    check = "import os, resource\nprint(os.getpriority(os.PRIO_PROCESS, 0), len(os.sched_getaffinity(0)), " \
            "resource.getrlimit(resource.RLIMIT_NOFILE)[1])"
    with SandboxedProgram(check, mode=mode) as p2:
        r2 = p2.run("")
    assert p2.server_id != p1.server_id and p2.served == 0  # a new server
    assert r2 is not None and r2.out.split() == [str(os.getpriority(os.PRIO_PROCESS, 0)),
                                                 str(len(os.sched_getaffinity(0))), "64"], r2


def test_a_server_that_died_idle_is_replaced():
    with SandboxedProgram(_server_pid_of_program() + "print(server)", mode="setsid") as p1:
        server = int(p1.run("").out)  # setsid mode: a pid of ours
    os.kill(server, signal.SIGKILL)
    assert _gone(server)
    with SandboxedProgram("print(1)", mode="setsid") as p2:
        assert p2.run("").out == "1\n"
    assert p2.server_id != p1.server_id


def test_no_reuse_means_a_sandbox_per_program(mode):
    ids = []
    for _ in range(2):
        with SandboxedProgram("print(1)", mode=mode, reuse=False) as p:
            assert p.run("").out == "1\n" and p.served == 0
            ids.append(p.server_id)
    with SandboxedProgram("print(1)", mode=mode) as p:
        assert p.server_id not in ids  # nor was either kept for later
    assert ids[0] != ids[1]


def test_servers_outlive_the_worker_threads(mode):
    """bwrap's --die-with-parent fires when the thread that started it ends: the pool's threads come and go."""
    close_servers()
    jobs = [{"tests": [("1 2\n", "3\n")], "response": answer("a, b = map(int, input().split())\nprint(a + b)")}] * 4
    assert all(g.correct for g in grade_code_many(jobs, workers=2, mode=mode))
    time.sleep(0.2)  # the pool's threads have ended
    with SandboxedProgram("print(1)", mode=mode) as p:
        assert p.run("").out == "1\n"
    assert p.served >= 1


def test_a_forked_child_leaves_our_servers_alone(mode):
    with SandboxedProgram("print(1)", mode=mode) as p1:
        assert p1.run("").out == "1\n"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            with SandboxedProgram("print(2)", mode=mode) as c:
                os.write(w, f"{c.server_id} {c.run('').out.strip()}".encode())
            close_servers()
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    server, out = os.read(r, 100).decode().split()
    os.close(r)
    assert out == "2" and server != p1.server_id  # the child started a server of its own
    with SandboxedProgram("print(3)", mode=mode) as p2:
        assert p2.run("").out == "3\n"
    assert p2.server_id == p1.server_id  # and ours still serves: the child neither used nor killed it
