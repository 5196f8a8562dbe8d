"""Tests that read the shared real traces skip where the traces are absent, and fail instead when
STEPSCOPE_REQUIRE_SHARED=1 (as in CI), through both ways in: the `traces_available` fixture and
`shared_trace_records()`."""

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


def run_probe(tmp_path: Path, traces: Path, require: str | None, records: int = 0) -> subprocess.CompletedProcess:
    """pytest on a two-test file that uses this suite's conftest, with the traces folder pointed at `traces`."""
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    for name in ("conftest.py", "tiny.py"):
        shutil.copy(TESTS / name, suite / name)
    (suite / "test_probe.py").write_text(PROBE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "STEPSCOPE_REQUIRE_SHARED"}
    env["STEPSCOPE_SHARED_TRACES"] = str(traces)
    env["PROBE_RECORDS"] = str(records)
    if require is not None:
        env["STEPSCOPE_REQUIRE_SHARED"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(suite)],
                          capture_output=True, text=True, cwd=suite, env=env, timeout=300)


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
