"""StepFlow without any engine: query geometry, OEB and SMI as pure functions, each row's step schedule, the
stats tally, the fused kernels and the one policy that checks them. The engines (stepscope.flow for transformers,
stepscope.vllm for vLLM) are adapters that translate their batch and cache layout into these inputs.

Modules: `geometry` (segments, each query's bridge and group and target: `query_geometry`), `oeb` (the
Odds-Equal Bridge in its PyTorch forms), `smi` (Step Momentum Injection), `rows` (one row's segmenter and SMI
schedule: `RowTracker`), `tally` (the five stats columns, `Tally`, `StepFlowStats`), `kernels` (fused Triton
decoding kernels) and `kernel_policy` (when the kernel runs: first-use check, fallback, tuning).
"""
