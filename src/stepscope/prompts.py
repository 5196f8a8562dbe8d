"""Generation prompts per model family, built through the tokenizer's own chat template.

Decisions:

- The instruction goes into the user turn, after the question; no system prompt unless asked for. This is
  DeepSeek's recommended form for R1 and its distills ("r1" style). "gpqa" asks for the option letter in
  \\boxed{}; "plain" sends the question alone.
- Every "think"/"markers" prompt ends inside the thinking: when the chat template does not itself end the
  generation prompt with the start marker (R1-distill and QwQ templates do), "<think>\\n" (the format's start
  marker and a newline) is appended. Reasoning models whose template knows the markers but lets the model
  open the thinking (Qwen3) get nothing else; for a model whose template never mentions the markers (a
  plain chat model such as SmolLM2) a short system instruction asks it to think first and close the thinking
  with the end marker (the start marker is never spelled out before the assistant's turn).
  So a generated response always starts inside the thinking, like the R1 traces in the wild.
- Harmony (GPT-OSS), and any format whose `prompt_opens_thinking` is off: nothing is appended; the model
  writes the analysis channel header itself.
"""

from __future__ import annotations

from .errors import StepscopeError
from .formats import Format, chat_template, get_format

STYLES = ("r1", "plain", "gpqa")

INSTRUCTIONS = {
    "r1": "Please reason step by step, and put your final answer within \\boxed{}.",
    "gpqa": "Please reason step by step, and put the letter of the correct option (for example A, B, C or D) "
            "within \\boxed{}.",
    "plain": "",
}


def think_instruction(fmt: Format) -> str:
    """The system instruction for a chat model that does not think on its own.

    It never spells out the start marker (the prompt already ends with it): a start marker inside the system
    text would open the thinking there for a format without an assistant-turn opener.
    """
    if fmt.think_start in fmt.think_end:
        return "Think step by step first; then close your thinking and write the final answer."
    return f"Think step by step first; then close your thinking with {fmt.think_end} and write the final answer."


def template_knows_thinking(tokenizer, fmt: Format) -> bool:
    """Whether the chat template mentions the format's markers (then the model is a reasoning model)."""
    t = chat_template(tokenizer)
    return bool(fmt.think_start and fmt.think_start in t) or bool(fmt.think_end and fmt.think_end in t)


def _apply_template(tokenizer, messages: list[dict]) -> str:
    if not chat_template(tokenizer):
        # no chat template: a bare completion prompt
        sys = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
        user = "".join(m["content"] for m in messages if m["role"] == "user")
        return sys + user + "\n"
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2 TemplateError and friends: templates that refuse a system turn
        if messages and messages[0]["role"] == "system":
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            try:
                return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
            except Exception:
                pass
        raise StepscopeError(f"the chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             ) from None


def build_prompt(tokenizer, question: str, style: str = "r1", system: str | None = None,
                 fmt: str | Format | None = None) -> tuple[str, list[int]]:
    """Return (prompt_text, prompt_ids) for one question, ready for generation.

    `style`: "r1" (default; "Please reason step by step, and put your final answer within \\boxed{}."),
    "gpqa" (the option letter in \\boxed{}) or "plain" (the question alone). `system`: an optional system
    prompt. `fmt`: a registered format's name ("think", "harmony"), a Format, or None/"auto"
    (stepscope.formats.get_format decides).
    The ids are the prompt text tokenized without extra special tokens (the template writes them).
    """
    if not isinstance(question, str) or not question.strip():
        raise StepscopeError("the question is empty")
    if style not in INSTRUCTIONS:
        raise StepscopeError(f"unknown prompt style {style!r}; use one of {', '.join(STYLES)}")
    f = get_format(fmt, tokenizer)
    instruction = INSTRUCTIONS[style]
    user = question.rstrip() + ("\n" + instruction if instruction else "")
    opens_thinking = f.prompt_opens_thinking
    if opens_thinking and not template_knows_thinking(tokenizer, f):
        system = (system.rstrip() + "\n\n" if system else "") + think_instruction(f)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = _apply_template(tokenizer, messages)
    if opens_thinking and not text.rstrip().endswith(f.think_start):
        text += f.think_start + "\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise StepscopeError("the prompt tokenizes to nothing")
    return text, list(ids)


def forced_close_text(fmt: Format) -> str:
    """What budget forcing writes to close the thinking and open the summary (the format's own text)."""
    return fmt.close_thinking_text()
