"""StepFlow, the test-time repair: Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers).

`StepFlow(model, tokenizer, config)` is a context manager; `StepFlowConfig` holds every knob (docs/method.md §5).

This package is the transformers engine, an adapter over the engine-free core (stepscope.core: geometry, OEB
and SMI as pure functions, the stats tally, the kernels). Modules: `config` (the knobs), `stepflow` (the
context: hooks on the model), `rows` (the batch rows and each forward's state), `state` (what one forward reads
on the device), `flow_stats` (the device-side recorder), `attention` (the registered attention function), `oeb`
(OEB attention of a padded batch in PyTorch), `decode_path` (a decoding step by the fused kernel or PyTorch),
`generate` (the batched generation loop).
"""

from .config import StepFlowConfig
from .decode_path import DecodePath
from .stepflow import StepFlow, StepFlowStats

__all__ = ["DecodePath", "StepFlow", "StepFlowConfig", "StepFlowStats"]

from .generate import generate_traces  # noqa: E402

__all__ += ["generate_traces"]
