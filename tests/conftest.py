import json
import os
from pathlib import Path

# Triton (when installed) is imported in interpreter mode in the tests, so that the fused decoding kernel runs
# on CPU (tests/test_flow_kernels.py, kernel="triton" in test_stepflow_decode.py); StepFlow's kernel="auto"
# picks the kernel on CUDA devices only, so every other test runs the PyTorch path as users' CPUs do.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tiny import make_model, make_tokenizer  # noqa: F401  (re-exported for tests)

# Real traces live beside the repository in ../shared/traces (never copied into it); STEPSCOPE_SHARED_TRACES
# points elsewhere. Where they are absent their tests skip, unless STEPSCOPE_REQUIRE_SHARED=1 (CI sets it in
# .ci/run): then a missing folder fails those tests instead of hiding them.
SHARED_TRACES = Path(os.environ.get("STEPSCOPE_SHARED_TRACES")
                     or Path(__file__).resolve().parents[2] / "shared" / "traces")


def _shared_traces_missing() -> str | None:
    """Why the shared traces cannot be used (None when they can); fails the test under STEPSCOPE_REQUIRE_SHARED."""
    if not SHARED_TRACES.is_dir():
        why = f"{SHARED_TRACES} is absent"
    elif not any(SHARED_TRACES.glob("*.jsonl")):
        why = f"{SHARED_TRACES} holds no .jsonl files"
    else:
        return None
    if os.environ.get("STEPSCOPE_REQUIRE_SHARED", "") not in ("", "0"):
        pytest.fail(f"STEPSCOPE_REQUIRE_SHARED is set but {why}", pytrace=False)
    return why


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


def require_vllm() -> None:
    """At the top of a tests/test_vllm*.py module: skip it when vLLM is not installed, fail it when
    STEPSCOPE_REQUIRE_VLLM=1 (set by .ci/run, whose scripts/test.sh installs vLLM)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("STEPSCOPE_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is not installed but STEPSCOPE_REQUIRE_VLLM=1", pytrace=False)
        pytest.skip("vLLM is not installed (scripts/test.sh installs it)", allow_module_level=True)
