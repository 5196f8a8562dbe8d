import json
import os
from pathlib import Path

# Triton (when installed) is imported in interpreter mode in the tests, so that the fused decoding kernel runs
# on CPU (tests/test_flow_kernels.py, kernel="triton" in test_stepflow_decode.py); StepFlow's kernel="auto"
# picks the kernel on CUDA devices only, so every other test runs the PyTorch path as users' CPUs do.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tiny import make_model, make_tokenizer  # noqa: F401  (re-exported for tests)

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def shared_trace_records():
    """Every record of ../shared/traces (never copied into the repo); [] when the folder is absent."""
    if not SHARED_TRACES.is_dir():
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
    if not SHARED_TRACES.is_dir():
        pytest.skip("../shared/traces is absent")
    return SHARED_TRACES
