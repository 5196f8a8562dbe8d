"""Prompts per model family: instruction, thinking start, system text, the template's own quirks."""

from __future__ import annotations

import copy

import pytest
from tiny import make_tokenizer

from stepscope.errors import StepscopeError
from stepscope.formats import HARMONY, THINK, get_format, markers_format
from stepscope.prompts import INSTRUCTIONS, build_prompt, forced_close_text, think_instruction
from stepscope.trace import Trace

Q = "What is 17 * 23?"

# Qwen3-like: knows the markers (strips old thinking from history) but lets the model open the thinking itself
QWEN3_LIKE = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def with_template(template):
    tok = copy.deepcopy(make_tokenizer("chatml"))
    tok.chat_template = template
    return tok


def test_r1_template_that_opens_the_thinking(think_tokenizer):
    text, ids = build_prompt(think_tokenizer, Q)
    assert text == ("<|im_start|>user\n" + Q + "\n" + INSTRUCTIONS["r1"] + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert "system" not in text  # DeepSeek's advice: no system prompt
    assert ids == think_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert think_tokenizer.decode(ids) == text
    t = Trace.from_ids(think_tokenizer, ids, fmt="think")
    assert t.segments["thinking"][0] < len(ids) and t.segments["summary"][0] == len(ids)  # ends inside thinking


def test_plain_chat_model_is_asked_to_think(chatml_tokenizer):
    text, _ = build_prompt(chatml_tokenizer, Q)
    assert text.startswith("<|im_start|>system\n" + think_instruction(THINK) + "<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    text2, _ = build_prompt(chatml_tokenizer, Q, system="You are terse.")
    assert "You are terse.\n\n" + think_instruction(THINK) in text2


def test_smollm2_own_template():
    tok = make_tokenizer("smollm2")
    text, ids = build_prompt(tok, Q)
    assert think_instruction(THINK) in text and text.endswith("<|im_start|>assistant\n<think>\n")
    assert "You are a helpful AI assistant named SmolLM" not in text  # our system turn replaces the default


def test_reasoning_template_gets_the_start_marker_only():
    tok = with_template(QWEN3_LIKE)
    text, _ = build_prompt(tok, Q)
    assert "system" not in text and text.endswith("<|im_start|>assistant\n<think>\n")


def test_harmony_appends_nothing(harmony_tokenizer):
    assert get_format("auto", harmony_tokenizer) is HARMONY  # the tiny template names no channel: the vocabulary does
    text, ids = build_prompt(harmony_tokenizer, Q, style="gpqa")
    assert text.endswith("<|start|>user<|message|>" + Q + "\n" + INSTRUCTIONS["gpqa"] + "<|end|><|start|>assistant")
    assert "<think>" not in text
    t = Trace.from_ids(harmony_tokenizer, ids, fmt="harmony")
    assert t.segments["question"] == (0, len(ids))  # the model writes the analysis channel itself


def test_styles(think_tokenizer):
    plain, _ = build_prompt(think_tokenizer, Q, style="plain")
    assert "<|im_start|>user\n" + Q + "<|im_end|>" in plain
    gpqa, _ = build_prompt(think_tokenizer, Q + "\nA) 1\nB) 2", style="gpqa")
    assert "letter" in gpqa and "\\boxed{}" in gpqa
    with pytest.raises(StepscopeError, match="prompt style"):
        build_prompt(think_tokenizer, Q, style="cot")
    with pytest.raises(StepscopeError, match="empty"):
        build_prompt(think_tokenizer, "  \n")


def test_template_without_system_role_gets_it_in_the_user_turn():
    tok = with_template(NO_SYSTEM)
    text, _ = build_prompt(tok, Q)
    assert text.startswith("<|im_start|>user\n" + think_instruction(THINK) + "\n\n" + Q)


def test_no_chat_template():
    tok = with_template(None)
    text, _ = build_prompt(tok, Q)
    assert text == think_instruction(THINK) + "\n\n" + Q + "\n" + INSTRUCTIONS["r1"] + "\n<think>\n"


def test_custom_markers(chatml_tokenizer):
    f = markers_format("<reasoning>", "</reasoning>")
    text, ids = build_prompt(chatml_tokenizer, Q, fmt=f)
    assert text.count("<reasoning>") == 1 and text.endswith("<reasoning>\n") and "</reasoning>" in text
    assert forced_close_text(f) == "\n</reasoning>\n\n"
    t = Trace.from_ids(chatml_tokenizer, ids + chatml_tokenizer("Hm.\n</reasoning>\n\nDone.")["input_ids"], fmt=f)
    assert t.thinking_closed and t.segment_text("summary") == "\n\nDone."


def test_forced_close_texts():
    assert forced_close_text(THINK) == "\n</think>\n\n"
    assert forced_close_text(HARMONY) == "<|end|><|start|>assistant<|channel|>final<|message|>"
