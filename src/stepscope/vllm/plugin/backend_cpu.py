"""The attention backend the plugin puts in place of vLLM's CPU_ATTN: CPU_ATTN itself, then StepFlow's rows
(backend.StepFlowImpl), reading CPU_ATTN's "vec" cache layout (paged.CpuVecLayout)."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .backend import StepFlowImpl
from .paged import CpuVecLayout


class StepFlowCPUAttentionImpl(StepFlowImpl, CPUAttentionBackendImpl):
    """CPU_ATTN, then OEB/SMI for the StepFlow rows of the batch."""

    kv_cache_update_in_forward = CPUAttentionBackend.forward_includes_kv_cache_update

    def stepflow_layout(self, layer) -> CpuVecLayout:
        return CpuVecLayout(getattr(layer, "isa", None))


class StepFlowCPUAttentionBackend(CPUAttentionBackend):
    """CPU_ATTN with StepFlow (same name, metadata, cache layout and kernel)."""

    @staticmethod
    def get_impl_cls() -> type[StepFlowCPUAttentionImpl]:
        return StepFlowCPUAttentionImpl
