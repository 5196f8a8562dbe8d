"""StepFlow, the test-time repair: Odds-Equal Bridge (shallow layers) and Step Momentum Injection (deep layers).

`StepFlow(model, tokenizer, config)` is a context manager; `StepFlowConfig` holds every knob (docs/method.md §5).
"""

from .config import StepFlowConfig
from .stepflow import StepFlow, StepFlowStats

__all__ = ["StepFlow", "StepFlowConfig", "StepFlowStats"]

from .generate import generate_traces  # noqa: E402

__all__ += ["generate_traces"]
