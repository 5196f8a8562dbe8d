"""Models whose attention StepFlow cannot reproduce exactly are refused with one clear line (core/support.py)."""

import pytest
import torch

from stepscope.errors import StepscopeError
from stepscope.flow import StepFlow, StepFlowConfig


def _gemma2(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, attn_logit_softcapping=softcap, sliding_window=8)
    return Gemma2ForCausalLM(cfg).eval()


def test_attention_logit_softcapping_is_refused(think_tokenizer):
    model = _gemma2(50.0)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(StepscopeError) as e:
        StepFlow(model, think_tokenizer, StepFlowConfig(fmt="think"))
    msg = str(e.value)
    assert "\n" not in msg and "softcapping" in msg and "gemma2" in msg
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # nothing was hooked
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_alibi_is_refused(think_tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2)).eval()
    with pytest.raises(StepscopeError, match="ALiBi"):
        StepFlow(model, think_tokenizer)


def test_the_check_names_each_feature_and_passes_plain_attention():
    from transformers import LlamaConfig

    from stepscope.core.support import attention_problem

    assert attention_problem(LlamaConfig()) is None
    for cfg, word in ((LlamaConfig(attn_logit_softcapping=30.0), "softcapping"),
                      (LlamaConfig(attention_chunk_size=8192), "chunked"),
                      (LlamaConfig(kv_lora_rank=512), "latent"),
                      (LlamaConfig(alibi=True), "ALiBi")):
        assert word in attention_problem(cfg)
