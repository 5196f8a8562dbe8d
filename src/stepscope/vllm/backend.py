"""The attention backend the plugin puts in place of vLLM's CPU_ATTN: CPU_ATTN itself, then StepFlow's rows.

Every layer first runs CPU_ATTN's own kernel over the whole batch, untouched. Then, only when this forward has
StepFlow requests (worker.WORKER.plan), `worker.apply_layer` recomputes those requests' thinking and summary
queries in the layers their config puts OEB on, and adds the step momentum in their SMI layers. A batch
without StepFlow requests costs one dictionary lookup per layer.
"""

from __future__ import annotations

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .worker import WORKER, apply_layer


class StepFlowCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU_ATTN, then OEB/SMI for the StepFlow rows of the batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stepscope_layer: int | None = None
        self._stepscope_isa: str | None = None
        WORKER.backend = True

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        if attn_metadata is None or self.attn_type != AttentionType.DECODER:
            return out
        plans = WORKER.plan(attn_metadata)
        if plans:
            if self._stepscope_layer is None:
                self._stepscope_layer = extract_layer_index(layer.layer_name)
                self._stepscope_isa = getattr(layer, "isa", None)
            n = attn_metadata.num_actual_tokens
            apply_layer(self, self._stepscope_layer, query[:n], kv_cache, attn_metadata, output[:n], plans)
        return out


class StepFlowCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with StepFlow (same name, metadata, cache layout and kernel)."""

    @staticmethod
    def get_impl_cls() -> type[StepFlowCPUAttentionImpl]:
        return StepFlowCPUAttentionImpl
