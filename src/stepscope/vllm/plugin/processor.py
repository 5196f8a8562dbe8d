"""The logits processor vLLM loads from the `vllm.logits_processors` entry point, in both of vLLM's model runners.

vLLM loads every installed `vllm.logits_processors` entry point into every engine, whatever its requests ask
for, so this class must be accepted by both loaders: it implements vLLM's V1 interface
(`vllm.v1.sample.logits_processor.LogitsProcessor`) and Model Runner V2's
(`vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`, whose loader accepts subclasses only). Each
runner constructs it with its own arguments: V1 `(vllm_config, device, is_pin_memory)`, V2 `(vllm_config,
req_states)`.

It changes no logits of a request StepFlow serves or of a plain request. Under V1 its job is `update_state`, which
vLLM calls before every forward with the requests added to, removed from and moved within the batch
(worker.Worker.update). `validate_params` runs in the front end when a request arrives: a bad StepFlow config,
or StepFlow asked of an engine the plugin cannot serve, is refused there with a one-line error (HTTP 400 on the
server), never decoded plainly.

StepFlow runs on the V1 model runner with synchronous scheduling (register.engine_problem). The front end cannot
see the engine's configuration; it refuses StepFlow wherever vLLM may choose Model Runner V2 from the
environment (register.frontend_problem). A StepFlow request that still reaches an engine that cannot serve it (a
server with async scheduling, or V2 forced by a feature that needs it) is stopped at its first token (its one
token is the end of sequence) and logged, never decoded plainly and never allowed to stop the engine.
"""

from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from ...errors import StepscopeError
from .register import engine_problem, frontend_problem, hook_request_removal, support_problem
from .requests import request_config, request_start
from .worker import WORKER, engine_tokenizer

log = logging.getLogger("stepscope.vllm")


def stop_rows(logits: torch.Tensor, rows, eos: int) -> torch.Tensor:
    """Make `eos` the only token rows `rows` of `logits` [N, V] can sample (in place)."""
    if len(rows):
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=logits.device)
        logits[idx] = float("-inf")
        logits[idx, eos] = 0.0
    return logits


class StepFlowLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            cfg = request_config(sampling_params)
            request_start(sampling_params)
        except StepscopeError as e:
            raise ValueError(f"StepFlow: {e}") from None
        if cfg is None:
            return
        problem = support_problem() or frontend_problem()
        if problem:
            raise ValueError(f"StepFlow: {problem}")
        if getattr(sampling_params, "n", 1) > 1:
            raise ValueError("StepFlow: use n=1 per request (one request per sample, each with its own seed)")

    def __init__(self, vllm_config, *args) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states)
        self.v2 = len(args) == 1
        self.problem = engine_problem(vllm_config)
        self.refused: set[int] = set()  # V2 slots of StepFlow requests this engine cannot serve
        self._eos: int | None = None
        self._config = vllm_config
        if not self.v2:  # built by the V1 model runner's __init__: hook its removal of finished requests
            WORKER.configure(vllm_config, self.problem)
            hook_request_removal()

    def is_argmax_invariant(self) -> bool:
        # False: a StepFlow request this engine cannot serve is stopped (its argmax changes). vLLM then calls `apply`
        # on greedy batches too; it returns the logits untouched unless such a request is in the batch.
        return False

    def eos(self) -> int:
        """The model's end-of-sequence token (its tokenizer's), the one token a refused request is given."""
        if self._eos is None:
            self._eos = int(engine_tokenizer(self._config).eos_token_id)
        return self._eos

    # -- V1 ------------------------------------------------------------------------------------------------------

    def update_state(self, batch_update) -> None:
        WORKER.update(batch_update)

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is None:  # V1: after the forward; stop the batch rows the worker refused
            WORKER.forward_done()
            rows = WORKER.refused_rows()
            return stop_rows(logits, rows, self.eos()) if rows else logits
        # V2: logits rows -> request slots
        if not self.refused:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        return stop_rows(logits, [i for i, s in enumerate(slots) if s in self.refused], self.eos())

    # -- V2 ------------------------------------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params) -> bool:
        self.refused.discard(req_idx)
        try:
            asks = request_config(sampling_params) is not None
        except StepscopeError:
            asks = True
        if not asks:
            return False
        self.refused.add(req_idx)
        log.error("StepFlow request stopped at its first token: %s", self.problem)
        return True
