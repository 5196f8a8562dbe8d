"""tests/test_vllm_tiny_llama.py's tests on a tiny random Qwen2 (q/k/v biases), with their own engine."""

from conftest import require_vllm

require_vllm()

import pytest  # noqa: E402
from test_vllm_tiny_llama import *  # noqa: E402,F401,F403


@pytest.fixture(scope="module")
def arch():
    return "qwen2"
