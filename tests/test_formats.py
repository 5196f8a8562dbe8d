"""The one format resolver and the one chat-template reader: what they decide, and that every user agrees."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from tiny import CHATML_TEMPLATE, THINK_TEMPLATE, make_model, make_tokenizer

from stepscope.errors import TraceError
from stepscope.formats import HARMONY, THINK, Format, chat_template, get_format, markers_format
from stepscope.prompts import build_prompt, template_knows_thinking
from stepscope.segment import Segmenter

Q = "What is 17 * 23?"


def with_template(template):
    tok = copy.deepcopy(make_tokenizer("chatml"))
    tok.chat_template = template
    return tok


def test_chat_template_reader():
    assert chat_template(None) == "" and chat_template(SimpleNamespace()) == ""
    assert chat_template(SimpleNamespace(chat_template=None)) == ""
    assert chat_template(SimpleNamespace(chat_template="T")) == "T"
    # named templates: the default one is what apply_chat_template renders; without one, all of them
    assert chat_template(SimpleNamespace(chat_template={"tool_use": "A <think>", "default": "B"})) == "B"
    assert chat_template(SimpleNamespace(chat_template={"x": "A", "y": "B"})) == "A\nB"


@pytest.mark.parametrize("family, text, want", [
    ("think", None, THINK),  # the template names the markers
    ("harmony", None, HARMONY),  # the vocabulary holds <|channel|> (the tiny template does not name it)
    ("chatml", None, THINK),  # a plain chat model, nothing to read: generate in think (the prompt asks for it)
    ("chatml", "a </think> b", THINK),  # a text: its markers tell
    ("chatml", "<|channel|>analysis<|message|>x", HARMONY),
    ("think", "plain words", THINK),  # the template comes first
])
def test_auto(family, text, want):
    tok = make_tokenizer(family)
    assert get_format("auto", tok, text=text) is want
    assert get_format(None, tok, text=text) is want


def test_a_text_nothing_explains_is_an_error(chatml_tokenizer):
    with pytest.raises(TraceError, match="cannot detect"):
        get_format("auto", chatml_tokenizer, text="no markers here")
    with pytest.raises(TraceError, match="cannot detect"):
        get_format("auto")  # no tokenizer and no text: nothing to go on


def test_named_and_given_formats(chatml_tokenizer):
    custom = Format("mine", "<a>", "</a>")
    assert get_format(custom, chatml_tokenizer) is custom
    assert get_format("harmony", chatml_tokenizer) is HARMONY and get_format("think") is THINK
    assert get_format("auto", markers=("<r>", "</r>")) == markers_format("<r>", "</r>")
    assert get_format("markers", markers=("<r>", "</r>")).think_end == "</r>"
    for kw, msg in [(dict(fmt="think", markers=("<r>", "</r>")), "use fmt='markers'"),
                    (dict(fmt="markers"), "needs markers"), (dict(fmt="nope"), "unknown format"),
                    (dict(fmt="markers", markers=("<r>", "<r>")), "must differ")]:
        with pytest.raises(TraceError, match=msg):
            get_format(**kw)


def test_named_templates_are_read_the_same_everywhere():
    """A tokenizer with named templates: the prompt, the thinking check and the format detection all read the
    default template, so they agree with the same tokenizer holding that template alone."""
    for default, other in [(THINK_TEMPLATE, CHATML_TEMPLATE), (CHATML_TEMPLATE, THINK_TEMPLATE)]:
        named, single = with_template({"tool_use": other, "default": default}), with_template(default)
        assert build_prompt(named, Q) == build_prompt(single, Q)
        assert template_knows_thinking(named, THINK) == template_knows_thinking(single, THINK)
        assert get_format("auto", named) is get_format("auto", single)


def test_segmenter_stepflow_and_generation_resolve_the_same_format():
    """`StepFlow(model, tok, StepFlowConfig())` on a plain chat model (the bundled SmolLM2's template names no
    markers) resolves the format generate_traces builds its prompts in."""
    from stepscope.flow import StepFlow, StepFlowConfig, generate_traces

    model = make_model("llama", layers=2)
    for family in ("smollm2", "chatml", "think", "harmony"):
        tok = make_tokenizer(family)
        want = get_format("auto", tok)
        assert Segmenter(tok, "auto").fmt is want
        assert StepFlow(model, tok, StepFlowConfig()).format is want
        if family in ("smollm2", "think"):
            tr = generate_traces(model, tok, [Q], stepflow=StepFlowConfig(), max_new_tokens=2, temperature=0,
                                 progress=False)[0]
            assert tr.format is want and tr.meta["config"]["fmt"] == want.to_json()
            assert tr.meta["config"]["stepflow"]["fmt"] == want.name
