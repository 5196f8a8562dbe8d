#!/usr/bin/env bash
# One device-machine run (see the README's benchmark section): the GPU and library versions, the fused OEB
# kernel's tests compiled on the GPU, then bench/stepflow_overhead.py (self-check, a short profile, batch 1 and
# 16). Everything lands in $OUT. Needs the tokenizer folder .devcache/tok (SmolLM2's tokenizer files).
# Extra arguments go to stepflow_overhead.py.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=src TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/stepscope_gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"
TRITON_INTERPRET=0 timeout "${KERNEL_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_flow_kernels.py 2>&1 | tail -25 | tee "$OUT/kernel_tests.log"
python3 bench/stepflow_overhead.py --device cuda --self-check --tokenizer .devcache/tok \
  --modes plain,stepflow,stepflow_torch,eager --warmup-tokens 64 --profile-tokens 32 --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/bench.log"
