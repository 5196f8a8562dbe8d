"""Step-Saliency: attention x gradient saliency pooled into step-to-step maps (docs/method.md §3).

    from stepscope.saliency import step_saliency, SaliencyResult
    result = step_saliency(model, trace)            # exact, chunked, memory near-linear in T
    result.maps                                     # float32 [L, S, S]
    result.save("out/trace-0")                      # maps.safetensors, trace.json, meta.json
"""

from .core import LOSSES, METHODS, POOLS, SaliencyError, loss_targets, step_saliency
from .memory import estimate_memory
from .result import SaliencyResult, find_results, load_result

__all__ = ["step_saliency", "SaliencyResult", "SaliencyError", "estimate_memory", "loss_targets",
           "load_result", "find_results", "POOLS", "LOSSES", "METHODS"]
