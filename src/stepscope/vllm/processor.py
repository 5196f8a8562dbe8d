"""The v1 logits processor that keeps StepFlow's per-request state in step with vLLM's persistent batch.

It changes no logits (`apply` returns them as they are; argmax invariant). Its job is `update_state`, which vLLM
calls before every forward with the requests added to, removed from and moved within the batch, each added one
with its SamplingParams, prompt ids and live output ids (worker.Worker.update). `validate_params` runs in the
front end when a request arrives: a bad StepFlow config, or StepFlow asked of an engine the plugin cannot
serve, is refused there with a one-line error (HTTP 400 on the server), never decoded plainly.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor.interface import LogitsProcessor

from ..errors import StepscopeError
from .plugin import support_problem
from .worker import WORKER, request_config, request_start


class StepFlowLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            cfg = request_config(sampling_params)
            request_start(sampling_params)
        except StepscopeError as e:
            raise ValueError(f"StepFlow: {e}") from None
        if cfg is None:
            return
        problem = support_problem()
        if problem:
            raise ValueError(f"StepFlow: {problem}")
        if getattr(sampling_params, "n", 1) > 1:
            raise ValueError("StepFlow: use n=1 per request (one request per sample, each with its own seed)")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        WORKER.vllm_config = vllm_config
        if getattr(vllm_config.scheduler_config, "async_scheduling", False):
            # the forward would run before the host knows each row's newest token, which StepFlow's segmenter needs
            WORKER.problem = ("StepFlow needs each row's newest token before the forward, which vLLM's async "
                              "scheduling does not give: start the engine with async_scheduling=False "
                              "(--no-async-scheduling)")

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        WORKER.update(batch_update)
