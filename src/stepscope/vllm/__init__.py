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
"""

from __future__ import annotations

from ..flow.config import StepFlowConfig
from .requests import cache_salt

__all__ = ["StepFlowConfig", "cache_salt", "collect_stats", "prompt", "sampling_params", "generate_traces"]


def prompt(token_ids, config: StepFlowConfig | None = None) -> dict:
    """A vLLM token prompt, salted with `cache_salt(config)` for a StepFlow request."""
    p = {"prompt_token_ids": [int(t) for t in token_ids]}
    salt = cache_salt(config)
    if salt:
        p["cache_salt"] = salt
    return p


def sampling_params(config: StepFlowConfig | None = None, key: str | None = None, **kwargs):
    """vLLM SamplingParams asking for StepFlow with `config` (plain when None); `key`: the id its stats are kept
    under (`collect_stats`)."""
    from vllm import SamplingParams

    extra = dict(kwargs.pop("extra_args", None) or {})
    if config is not None:
        extra["stepflow"] = config.to_json()
        if key is not None:
            extra["stepflow_id"] = str(key)
    return SamplingParams(extra_args=extra or None, **kwargs)


def collect_stats(llm, keys=None, clear: bool = False) -> dict:
    """StepFlow's counts per request key (`extra_args["stepflow_id"]`), as `StepFlowStats`, from every worker of
    the engine `llm` (an `LLM`, or anything with vLLM's `collective_rpc`). OEB counts are summed over
    tensor-parallel ranks (each holds some heads); SMI fires and tokens are per position (rank 0's). `clear`
    forgets the returned finished requests."""
    from .plugin import STATS_RPC
    from .stats import merge_ranks

    ranks = llm.collective_rpc(STATS_RPC, args=(None if keys is None else list(keys), clear))
    return merge_ranks(ranks)


def generate_traces(llm, tokenizer, questions, **kwargs):
    """`stepscope.flow.generate_traces` on a vLLM engine: see runner.generate_traces."""
    from .runner import generate_traces as run

    return run(llm, tokenizer, questions, **kwargs)
