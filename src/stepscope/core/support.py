"""Which attention StepFlow can reproduce exactly: the one check every engine makes before it repairs a model.

StepFlow recomputes a layer's attention itself (OEB) and adds to its output (SMI), from the queries, keys and
values and the plain causal softmax, with a sliding window and GPT-OSS's sink logits as the only extras
(docs/method.md §5). A model whose attention has more than that would be repaired with the wrong probabilities,
silently; `attention_problem` names the first such feature of a model's config, and the engines refuse the model
with that line:
- attention-logit softcapping (Gemma 2: `attn_logit_softcapping`), tanh applied to the scores before the softmax;
- ALiBi position biases (BLOOM, MPT, Falcon with `alibi`), added to the scores;
- chunked local attention (Llama 4: `attention_chunk_size`), keys hidden by chunk, not by a sliding window;
- multi-head latent attention (DeepSeek V2/V3: `kv_lora_rank`), whose value head size differs from the query's
  and whose engines' kernels StepFlow does not read;
- encoder-decoder models (cross-attention is not causal over one trace).
Final-logit softcapping (Gemma 2's `final_logit_softcapping`) acts after the last layer, not in attention: allowed.
"""

from __future__ import annotations

ALIBI_TYPES = ("bloom",)  # model types whose attention always carries ALiBi biases


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def attention_problem(config) -> str | None:
    """Why StepFlow cannot reproduce the attention of a model with this (Hugging Face) config, or None when it
    can. `config`: a transformers PretrainedConfig (vLLM's `model_config.hf_config` is one)."""
    cfg = _text_config(config)
    name = getattr(cfg, "model_type", None) or type(cfg).__name__

    def refuse(feature: str) -> str:
        return (f"StepFlow cannot reproduce this model's attention exactly: {name} uses {feature}, which StepFlow's "
                "attention does not implement (docs/stepflow.md, supported models)")

    if getattr(cfg, "attn_logit_softcapping", None):
        return refuse(f"attention-logit softcapping (attn_logit_softcapping={cfg.attn_logit_softcapping})")
    attn_config = getattr(cfg, "attn_config", None)  # MPT keeps its attention settings in a nested config
    nested_alibi = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi",
                                                                                          None)
    if getattr(cfg, "alibi", False) or nested_alibi or getattr(cfg, "model_type", None) in ALIBI_TYPES \
            or getattr(cfg, "position_embedding_type", None) == "alibi":
        return refuse("ALiBi position biases")
    if getattr(cfg, "attention_chunk_size", None):
        return refuse(f"chunked local attention (attention_chunk_size={cfg.attention_chunk_size})")
    if getattr(cfg, "kv_lora_rank", None):
        return refuse("multi-head latent attention (kv_lora_rank)")
    if getattr(config, "is_encoder_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        return refuse("an encoder-decoder architecture")
    return None
