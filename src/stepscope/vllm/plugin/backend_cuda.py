"""The attention backend the plugin puts in place of vLLM's FLASH_ATTN on CUDA: FlashAttention itself, then
StepFlow's rows (backend.StepFlowImpl), reading FlashAttention's cache layout (paged.FlashLayout) with the fused
paged Triton kernel for decoding rows.

CUDA graphs. StepFlow's per-forward planning is host code (which rows, where their steps start): a full CUDA graph
would replay the first forward's plan for every later one. On an engine that can serve StepFlow (V1 model runner,
synchronous scheduling: register.engine_problem) the metadata builder therefore declares no full-graph support
(`AttentionCGSupport.NEVER`), and vLLM downgrades its default FULL_AND_PIECEWISE mode to PIECEWISE: the layers
between attention calls stay in CUDA graphs, attention runs eagerly. An explicit full-graph `cudagraph_mode` is
refused by vLLM itself, with its own message. This holds for every request of such an engine, with or without
StepFlow; exclude the plugin (VLLM_PLUGINS) to get full graphs back. Any other engine (vLLM's CUDA defaults: Model
Runner V2 and async scheduling) keeps FlashAttention's own CUDA graph support.

This module has not run on a GPU in stepscope's own tests (docs/vllm.md says what has).
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from .backend import StepFlowImpl
from .paged import FlashLayout
from .register import engine_problem


class StepFlowFlashAttentionImpl(StepFlowImpl, FlashAttentionImpl):
    """FLASH_ATTN, then OEB/SMI for the StepFlow rows of the batch."""

    kv_cache_update_in_forward = FlashAttentionBackend.forward_includes_kv_cache_update

    def stepflow_layout(self, layer) -> FlashLayout:
        return FlashLayout()

    def stepflow_window(self) -> int | None:
        # FlashAttentionImpl keeps (window - 1, 0) for a causal sliding window, (-1, -1) without one
        left = self.sliding_window[0] if self.sliding_window else -1
        return int(left) + 1 if left >= 0 else None


class StepFlowFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's metadata, without full CUDA graph support where the engine can serve StepFlow (see the
    module docstring); FlashAttention's own support where it cannot (Model Runner V2, async scheduling), since
    StepFlow then never acts."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if vllm_config is not None and engine_problem(vllm_config):
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER


class StepFlowFlashAttentionBackend(FlashAttentionBackend):
    """FLASH_ATTN with StepFlow (same name, metadata, cache layout and kernel; piecewise CUDA graphs)."""

    @staticmethod
    def get_impl_cls() -> type[StepFlowFlashAttentionImpl]:
        return StepFlowFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[StepFlowFlashAttentionMetadataBuilder]:
        return StepFlowFlashAttentionMetadataBuilder
