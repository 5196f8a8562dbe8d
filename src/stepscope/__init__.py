"""stepscope: where a reasoning model's step flow breaks (Step-Saliency), and its test-time repair (StepFlow).

The public API is imported lazily, so `import stepscope` and `stepscope --help` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Trace": "stepscope.trace",
    "Step": "stepscope.segment",
    "Segmenter": "stepscope.segment",
    "load_traces": "stepscope.trace",
    "load_model": "stepscope.models",
    "load_tokenizer": "stepscope.models",
    "StepscopeError": "stepscope.errors",
    "step_saliency": "stepscope.saliency",
    "SaliencyResult": "stepscope.saliency",
    "StepFlow": "stepscope.flow",
    "StepFlowConfig": "stepscope.flow",
    "generate_traces": "stepscope.flow",
    "calibrate": "stepscope.calibration",
}

__all__ = ["__version__", "diagnose", *_EXPORTS]


def __getattr__(name: str):
    if name == "diagnose":  # the package, which is callable: stepscope.diagnose(result) diagnoses a result
        return importlib.import_module("stepscope.diagnose")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'stepscope' has no attribute {name!r}")
