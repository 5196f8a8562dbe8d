#!/usr/bin/env bash
# The device-machine run (docs/performance.md, bench/RESULTS.md), in two phases that fit one device session with
# room for a rerun of the first:
#   bash bench/gpu_run.sh check   # ~3 min: GPU and library versions, the fused OEB kernel's tests compiled on the
#                                 # GPU, the kernel alone against sdpa, dense and over a paged cache in vLLM's
#                                 # layout (bench/oeb_kernel.py [--paged]), StepFlow's self-check, the
#                                 # synchronizing CUDA operations per token of plain and StepFlow
#                                 # and profiles of plain and StepFlow at batch 1 and 16 -> $OUT/check
#   bash bench/gpu_run.sh bench   # ~6 min: bench/stepflow_overhead.py's timed rounds, batch 1 and 16 -> $OUT/bench
#   bash bench/gpu_run.sh         # both
# Needs the tokenizer folder .devcache/tok (SmolLM2's tokenizer files). Extra arguments go to
# stepflow_overhead.py.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/stepscope_gpu}
phase=${1:-all}
[ $# -gt 0 ] && shift
case "$phase" in check|bench|all) ;; *) echo "usage: bash bench/gpu_run.sh [check|bench|all] [args]" >&2; exit 2;; esac
COMMON=(--device cuda --tokenizer .devcache/tok --modes plain,stepflow,stepflow_torch,eager --warmup-tokens 64)
if [ "$phase" != bench ]; then
  mkdir -p "$OUT/check"
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
  } 2>&1 | tee "$OUT/check/gpu.txt"
  TRITON_INTERPRET=0 timeout "${KERNEL_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_flow_kernels.py 2>&1 | tail -25 | tee "$OUT/check/kernel_tests.log"
  timeout 120 python3 bench/oeb_kernel.py --out "$OUT/check" 2>&1 | tee "$OUT/check/oeb_kernel.log"
  timeout 120 python3 bench/oeb_kernel.py --paged --out "$OUT/check" 2>&1 | tee "$OUT/check/oeb_kernel_paged.log"
  python3 bench/stepflow_overhead.py "${COMMON[@]}" --no-timing --self-check --sync-check --profile-tokens 24 \
    --profile-batch-sizes 1,16 --out "$OUT/check" "$@" 2>&1 | tee "$OUT/check/bench.log"
fi
if [ "$phase" != check ]; then
  mkdir -p "$OUT/bench"
  python3 bench/stepflow_overhead.py "${COMMON[@]}" --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench/bench.log"
fi
