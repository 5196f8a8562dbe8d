"""What StepFlow's attention backends share: the backend's own forward over the whole batch, then StepFlow's rows.

Every layer runs the backend's own kernel over the whole batch, untouched. Then, only when this forward has
StepFlow requests (worker.WORKER.plan), `layer.apply_layer` recomputes those requests' thinking and summary
queries in the layers their config puts OEB on, and adds the step momentum in their SMI layers. A batch
without StepFlow requests costs one dictionary lookup per layer. One exception: in a layer where StepFlow
recomputes every token of the forward (every row is a StepFlow decoding row that OEB repairs there), the
backend's own kernel would only compute an output that is overwritten, and is not run.

`StepFlowImpl` is mixed into one vLLM attention implementation per platform: backend_cpu.py (CPU_ATTN) and
backend_cuda.py (FLASH_ATTN). Each says how its cache is laid out (`stepflow_layout`) and how it stores its
sliding window; everything else is here and in worker.py, the same on both.
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionType

from .layer import LayerSpec, apply_layer
from .worker import WORKER


class StepFlowImpl:
    """Mixin for a vLLM AttentionImpl: its forward, then OEB/SMI for the StepFlow rows of the batch."""

    # whether the backend's forward also writes this forward's keys and values into the cache (its backend
    # class's `forward_includes_kv_cache_update`): then the forward always runs, even where StepFlow overwrites
    # its whole output
    kv_cache_update_in_forward = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stepflow_spec: LayerSpec | None = None
        WORKER.attach_backend()

    def stepflow_layout(self, layer):
        """The paged cache layout this backend uses for `layer` (stepscope.vllm.plugin.paged)."""
        raise NotImplementedError

    def stepflow_window(self) -> int | None:
        """The layer's sliding window in keys (a query sees keys > position - window), None for full attention."""
        w = getattr(self, "sliding_window", None)
        return int(w) if w and w > 0 else None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plans = None
        if attn_metadata is not None and self.attn_type == AttentionType.DECODER:
            plans = WORKER.plan(attn_metadata)
        if not plans:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        spec = self._stepflow_spec
        if spec is None:
            from vllm.model_executor.models.utils import extract_layer_index

            spec = self._stepflow_spec = LayerSpec(
                extract_layer_index(layer.layer_name), self.stepflow_layout(layer), self.stepflow_window(),
                self.num_heads, self.num_kv_heads, float(self.scale), getattr(self, "sinks", None))
        n = attn_metadata.num_actual_tokens
        work = WORKER.shared.layer_work(spec, plans, attn_metadata.block_table, kv_cache.shape[2], n)
        out = output
        if work is None or not work.covers or self.kv_cache_update_in_forward:
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                  output_block_scale)
        if work is not None:
            apply_layer(spec, query[:n], kv_cache, attn_metadata, output[:n], plans, WORKER.shared, work=work)
        return out
