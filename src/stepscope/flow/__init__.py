"""StepFlow, the test-time repair: Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers).

`StepFlow(model, tokenizer, config)` is a context manager; `StepFlowConfig` holds every knob (docs/method.md §5).

Modules: `config` (the knobs), `functional` (the OEB and SMI mathematics as pure functions, engine-agnostic),
`stepflow` (the context: hooks on the model), `rows` (per-row segmenters and SMI schedule), `state` (what one
forward reads on the device), `flow_stats` (the tallies), `attention` (the registered attention function), `oeb`
(OEB attention in PyTorch), `decode_path` and `kernels` (a decoding step by the fused Triton kernel or PyTorch),
`generate` (the batched generation loop).
"""

from .config import StepFlowConfig
from .decode_path import DecodePath
from .stepflow import StepFlow, StepFlowStats

__all__ = ["DecodePath", "StepFlow", "StepFlowConfig", "StepFlowStats"]

from .generate import generate_traces  # noqa: E402

__all__ += ["generate_traces"]
