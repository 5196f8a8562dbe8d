"""Builders for tiny random models and family-flavoured tokenizers, shared by the tests.

All tokenizers are the real SmolLM2 byte-level BPE tokenizer (the only real one available offline), given
the chat template of each family: QwQ/R1 style (generation prompt ends with "<think>\n"), Qwen3 style (plain
ChatML; the model writes "<think>" itself) and GPT-OSS harmony (special tokens added).
"""

from __future__ import annotations

import copy
import functools

import torch

THINK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]
HARMONY_TEMPLATE = (
    "{{ '<|start|>system<|message|>You are a helpful assistant.\nReasoning: medium\n"
    "# Valid channels: analysis, commentary, final.<|end|>' }}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
)


@functools.lru_cache(maxsize=1)
def _base_tokenizer():
    from stepscope.models import load_tokenizer

    return load_tokenizer("default")


def make_tokenizer(family: str = "think"):
    """A fresh copy of the real SmolLM2 tokenizer with the chat template of `family`."""
    tok = copy.deepcopy(_base_tokenizer())
    if family == "think":
        tok.chat_template = THINK_TEMPLATE
    elif family == "chatml":
        tok.chat_template = CHATML_TEMPLATE
    elif family == "harmony":
        tok.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
        tok.chat_template = HARMONY_TEMPLATE
    elif family == "smollm2":
        pass
    else:
        raise ValueError(family)
    return tok


def make_model(arch: str = "llama", vocab_size: int = 49152, layers: int = 4, seed: int = 0,
               attn_implementation: str = "sdpa", dtype=torch.float32, **overrides):
    """A tiny random causal LM of the given architecture ("llama", "qwen2", "qwen3", "mistral", "gptoss")."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=False)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif arch == "gptoss":
        c = dict(common)
        c.update(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                 sliding_window=8, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(layers)])
        cfg = tf.GptOssConfig(**c)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if arch == "gptoss" and attn_implementation == "sdpa":
        attn_implementation = "eager"  # transformers has no sdpa path for GPT-OSS (sinks)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    if arch == "gptoss":  # random sinks of a visible size, so that tests see them matter
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    model.eval()
    return model


def save_model_dir(path, family: str = "think", layers: int = 2):
    """A tiny llama with the `family` tokenizer, saved where `--model PATH` loads it; returns the path."""
    tok = make_tokenizer(family)
    make_model("llama", vocab_size=len(tok), layers=layers).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def peaked(model, factor: float = 40.0):
    """Sharpen a random model's next-token distribution, as a trained model's is. On a random model's nearly
    flat distribution over 49k tokens, float noise of 1e-7 in the logits (a batched forward against a lone one)
    can move the top-p cut or an inverse-CDF boundary by one token; on a peaked one it cannot."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


def new_ids(trace) -> list[int]:
    return trace.token_ids[trace.meta["num_prompt_tokens"]:]


def teacher_forced(model, tok, cfg, prompt_ids, gen):
    """Log-probabilities [len(gen), V] of one forward over prompt + gen[:-1] (under StepFlow with `cfg`, the
    transformers engine's, when cfg is not None), and the StepFlow stats of that forward (None when plain)."""
    from stepscope.flow import StepFlow

    x = torch.tensor([list(prompt_ids) + list(gen[:-1])])
    with torch.no_grad():
        if cfg is None:
            return torch.log_softmax(model(x).logits[0].float(), -1)[len(prompt_ids) - 1:], None
        with StepFlow(model, tok, cfg, kernel="torch") as flow:
            logits = model(x).logits[0].float()
        return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:], flow.stats


def assert_same_counts(s, ref, tokens: int) -> None:
    """vLLM's StepFlowStats `s` of one request against the transformers engine's `ref` for the same tokens: equal
    fire and eligible counts, masses within 1e-4, `tokens` query positions, and OEB fired."""
    assert s.tokens == tokens
    assert s.oeb_fires == ref.oeb_fires and s.oeb_eligible == ref.oeb_eligible
    assert s.smi_fires == ref.smi_fires
    for name in ("bridge_mass_before", "bridge_mass_after", "group_mass_before", "group_mass_after"):
        a, b = getattr(s, name), getattr(ref, name)
        assert all(abs(a[j] - b[j]) < 1e-4 for j in a), name
    assert s.total_oeb_fires > 0
