"""Tests that read the shared real traces skip where the traces are absent, and fail instead when
STEPSCOPE_REQUIRE_SHARED=1 (as in CI), through both ways in: the `traces_available` fixture and
`shared_trace_records()`. The same for the other STEPSCOPE_REQUIRE_* flags (Triton, the data packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = '''
import os

from conftest import shared_trace_records


def test_fixture(traces_available):
    assert traces_available.is_dir()


def test_records():
    assert shared_trace_records() == [{"question": "q", "response": "r"}] * int(os.environ["PROBE_RECORDS"])
'''


def run_suite(tmp_path: Path, probe: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """pytest on a test file `probe` that uses this suite's conftest, with no STEPSCOPE_REQUIRE_* flag but those
    in `env`."""
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    for name in ("conftest.py", "tiny.py"):
        shutil.copy(TESTS / name, suite / name)
    (suite / "test_probe.py").write_text(probe, encoding="utf-8")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("STEPSCOPE_REQUIRE_")}, **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", str(suite)],
                          capture_output=True, text=True, cwd=suite, env=env, timeout=300)


def run_probe(tmp_path: Path, traces: Path, require: str | None, records: int = 0) -> subprocess.CompletedProcess:
    """pytest on a two-test file that uses this suite's conftest, with the traces folder pointed at `traces`."""
    env = {"STEPSCOPE_SHARED_TRACES": str(traces), "PROBE_RECORDS": str(records)}
    if require is not None:
        env["STEPSCOPE_REQUIRE_SHARED"] = require
    return run_suite(tmp_path, PROBE, env)


@pytest.mark.parametrize("require", [None, "0"])
def test_absent_traces_skip_without_the_requirement(tmp_path, require):
    r = run_probe(tmp_path, tmp_path / "nowhere", require)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout and "nowhere is absent" in r.stdout


@pytest.mark.parametrize("contents", ["absent", "empty"])
def test_missing_traces_fail_when_required(tmp_path, contents):
    traces = tmp_path / "traces"
    if contents == "empty":
        traces.mkdir()
    r = run_probe(tmp_path, traces, "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 error" in r.stdout, r.stdout  # a failing fixture reports as an error of its test
    why = "is absent" if contents == "absent" else "holds no .jsonl files"
    assert r.stdout.count(f"STEPSCOPE_REQUIRE_SHARED is set but {traces} {why}") >= 2, r.stdout


def test_present_traces_are_read_when_required(tmp_path):
    traces = tmp_path / "traces"
    traces.mkdir()
    (traces / "a.jsonl").write_text('{"question": "q", "response": "r"}\n\n', encoding="utf-8")
    r = run_probe(tmp_path, traces, "1", records=1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout


# triton and a data package made unimportable: each test that needs them skips, or fails under its flag
MISSING_PROBE = '''
import sys

sys.modules["triton"] = sys.modules["mmath"] = None  # find_spec then finds nothing

from conftest import has_module, require_data_package, require_triton


def test_triton():
    require_triton()


def test_data():
    require_data_package("mmath")


def test_kernel_list():
    assert not has_module("triton", "TRITON")
'''


def test_missing_dependencies_skip_without_their_flags(tmp_path):
    r = run_suite(tmp_path, MISSING_PROBE, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped" in r.stdout and "triton is not installed" in r.stdout


@pytest.mark.parametrize("flag, failed", [("TRITON", ["test_triton", "test_kernel_list"]), ("DATA", ["test_data"])])
def test_missing_dependencies_fail_under_their_flags(tmp_path, flag, failed):
    r = run_suite(tmp_path, MISSING_PROBE, {f"STEPSCOPE_REQUIRE_{flag}": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert sorted(x.split("::")[1].split()[0] for x in r.stdout.splitlines() if x.startswith("FAILED")) == \
        sorted(failed), r.stdout
    assert f"STEPSCOPE_REQUIRE_{flag} is set but" in r.stdout
