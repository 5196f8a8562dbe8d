"""StepFlow inside vLLM: a plugin (entry points, no code in the user's script) and the helpers around it.

Install `stepscope[vllm]`; vLLM then loads the plugin by itself (`vllm.general_plugins` and
`vllm.logits_processors` entry points). A request opts in through its sampling parameters:

    from vllm import LLM, SamplingParams
    from stepscope.flow import StepFlowConfig
    import stepscope.vllm as sv

    llm = LLM(model=path, dtype="float32")
    cfg = StepFlowConfig(fmt="think")
    params = SamplingParams(max_tokens=256, extra_args={"stepflow": cfg.to_json(), "stepflow_id": "q1"})
    out = llm.generate([sv.prompt(ids, cfg)], params)      # or any prompt; sv.prompt adds a cache salt
    print(sv.collect_stats(llm)["q1"].summary())

Requests without `extra_args["stepflow"]` run untouched, in the same batches. See docs/vllm.md.

Two subpackages, by where their code runs: `plugin/` is what vLLM loads inside its own processes (the entry
points, the attention backends, the worker's per-request state, the stats file's writer); `driver/` is
stepscope's own driver of vLLM engines in the user's process (this module's helpers, the trace runner, the
engines of `--engine vllm`). The driver imports the plugin, never the reverse. `stats_file` (a server's stats
file, written by the plugin's workers, read by `stepscope vllm-stats`) is reachable here as
`stepscope.vllm.stats_file`. The driver's names load on first use, so that vLLM's processes, which import this
package before the plugin's modules, never load the driver.
"""

from __future__ import annotations

import importlib

from ..flow.config import StepFlowConfig
from .plugin.requests import cache_salt

__all__ = ["StepFlowConfig", "cache_salt", "collect_stats", "prompt", "sampling_params", "generate_traces",
           "stats_file"]
_LAZY = {"collect_stats": ".driver.client", "prompt": ".driver.client", "sampling_params": ".driver.client",
         "generate_traces": ".driver.runner", "stats_file": ".plugin.stats_file"}


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    return module if name == "stats_file" else getattr(module, name)
