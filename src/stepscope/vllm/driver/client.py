"""What a user's script hands a vLLM engine for StepFlow, and what it reads back: salted prompts, sampling
parameters that ask for StepFlow, and the workers' statistics over `collective_rpc`.

Runs in the user's process (stepscope.vllm re-exports these); the plugin (stepscope.vllm.plugin) answers inside
vLLM's processes.
"""

from __future__ import annotations

from ...flow.config import StepFlowConfig
from ..plugin.requests import cache_salt


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
    from ..plugin.register import STATS_RPC
    from ..plugin.stats import merge_ranks

    ranks = llm.collective_rpc(STATS_RPC, args=(None if keys is None else list(keys), clear))
    return merge_ranks(ranks)
