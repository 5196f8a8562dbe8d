"""Trace formats: every marker of a model family in one registry, the one chat-template reader, and the one
resolver of a trace's format."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TraceError


@dataclass(frozen=True)
class Format:
    """Everything stepscope knows about how a model family marks its turn, its thinking and its final answer.

    - `think_start` ends the question segment, `think_end` ends the thinking segment; both are matched as text,
      so they work whether the tokenizer holds them as one special token or as several pieces.
    - `assistant_start` lists strings that open the assistant's turn: when the chat template holds one of them,
      the start marker is only looked for after it, so a marker string quoted inside the question cannot open
      the thinking.
    - `summary_start` (harmony) is the final-answer marker: it opens the summary straight from the question, for
      a model that skips thinking, and in a response string the summary is what follows it, up to the first of
      `summary_end`. Without one the summary of a string is what follows the last `think_end`.
    - `end_of_turn`: single special tokens that end the assistant's turn (generation stops at them).
    - `detect`: strings whose presence in a chat template, a text or the vocabulary names this format
      (`detect_format`, `get_format`).
    - `prompt_opens_thinking`: the generation prompt ends inside the thinking (the start marker is appended
      when the chat template does not write it); harmony models write their analysis header themselves.
    - `forced_close`: what budget forcing writes to close the thinking and open the summary (None:
      `"\\n" + think_end + "\\n\\n"`).

    A format's JSON (`to_json`) holds its segmentation markers; `from_json` of a registered format's JSON gives
    back the registered format with all its markers.
    """

    name: str
    think_start: str
    think_end: str
    assistant_start: tuple[str, ...] = ()
    summary_start: str | None = None
    summary_end: tuple[str, ...] = ()
    end_of_turn: tuple[str, ...] = ()
    detect: tuple[str, ...] = ()
    prompt_opens_thinking: bool = True
    forced_close: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "think_start": self.think_start, "think_end": self.think_end,
                "assistant_start": list(self.assistant_start), "summary_start": self.summary_start}

    @classmethod
    def from_json(cls, d: dict) -> Format:
        f = cls(d["name"], d["think_start"], d["think_end"], tuple(d.get("assistant_start", ())),
                d.get("summary_start"))
        known = FORMATS.get(f.name)
        return known if known is not None and known.to_json() == f.to_json() else f

    def close_thinking_text(self) -> str:
        """What budget forcing writes to close the thinking and open the summary."""
        return self.forced_close if self.forced_close is not None else "\n" + self.think_end + "\n\n"

    def summary_in(self, text: str, *, starts_in_thinking: bool = True) -> str | None:
        """The summary of a response string in this format, or None when its thinking never closed.

        With a final-answer marker: the text after the last one, up to the first summary end marker; else the
        text after the last thinking end marker. A text without them is "thinking never closed" when it starts
        inside the thinking (`starts_in_thinking`, as R1-style prompts do) or opens it itself; otherwise all of
        it is the summary (a model that does not think).
        """
        if self.summary_start and self.summary_start in text:
            final = text[text.rindex(self.summary_start) + len(self.summary_start):]
            cut = min((final.find(s) for s in self.summary_end if s in final), default=len(final))
            return final[:cut]
        if not self.summary_start and self.think_end in text:
            return text[text.rindex(self.think_end) + len(self.think_end):]
        if starts_in_thinking or self.think_start in text:
            return None
        return text


# the end-of-turn special tokens of the chat templates that think-style models use
CHAT_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<｜end▁of▁sentence｜>",
                    "<end_of_turn>", "</s>", "<|end_of_turn|>")

THINK = Format(
    "think", "<think>", "</think>",
    assistant_start=("<|im_start|>assistant", "<｜Assistant｜>", "<|assistant|>",
                     "<|start_header_id|>assistant<|end_header_id|>", "<start_of_turn>model"),
    end_of_turn=CHAT_END_OF_TURN, detect=("<think>", "</think>"),
)
# GPT-OSS: "<|end|>" closes the analysis message (not the turn); the turn ends at "<|return|>" or "<|call|>"
HARMONY = Format(
    "harmony", "<|channel|>analysis<|message|>", "<|end|>",
    assistant_start=("<|start|>assistant",), summary_start="<|channel|>final<|message|>",
    summary_end=("<|return|>", "<|end|>", "<|call|>"), end_of_turn=("<|return|>", "<|call|>"),
    detect=("<|channel|>",), prompt_opens_thinking=False,
    forced_close="<|end|><|start|>assistant<|channel|>final<|message|>",
)
# the registry, in detection order (register_format adds to it); "think" is the default for generation
FORMATS: dict[str, Format] = {"harmony": HARMONY, "think": THINK}
_RESERVED = ("auto", "markers")


def register_format(fmt: Format) -> Format:
    """Add a format to the registry: `get_format`, `StepFlowConfig(fmt=...)`, the CLI's `--fmt`, detection
    (after the built-in formats), grading's answer extraction and generation's stop tokens all see it."""
    if not isinstance(fmt, Format):
        raise TraceError(f"register_format takes a Format, got {type(fmt).__name__}")
    if fmt.name in _RESERVED or fmt.name in FORMATS:
        raise TraceError(f"a format named {fmt.name!r} already exists")
    if not fmt.think_start or not fmt.think_end or fmt.think_start == fmt.think_end:
        raise TraceError(f"format {fmt.name!r}: the start and end markers must be two different non-empty strings")
    FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> list[str]:
    """The registered formats' names, in detection order."""
    return list(FORMATS)


def markers_format(start: str, end: str) -> Format:
    """A format for any other model: user-given start and end strings (in any chat template: its end-of-turn
    tokens are the think format's)."""
    if not start or not end:
        raise TraceError("markers need a non-empty start and end string")
    if start == end:
        raise TraceError(f"the start and end markers must differ (both {start!r})")
    return Format("markers", start, end, end_of_turn=THINK.end_of_turn)


def end_of_turn_markers(fmt: Format | None = None) -> tuple[str, ...]:
    """The end-of-turn tokens of `fmt`, or of every registered format (None)."""
    if fmt is not None:
        return fmt.end_of_turn
    return tuple(dict.fromkeys(m for f in FORMATS.values() for m in f.end_of_turn))


def response_summary(text: str, fmt: str | Format | None = None, *, starts_in_thinking: bool = True) -> str | None:
    """The summary of a response string (`Format.summary_in`), or None when its thinking never closed.

    `fmt` None reads the format from the text: the first registered format whose closing marker (its
    final-answer marker, else its thinking end marker) the text holds. A text that holds none is "thinking never
    closed" when it starts inside the thinking or opens a registered format's thinking; else it is all summary.
    """
    if fmt is not None:
        return get_format(fmt).summary_in(text, starts_in_thinking=starts_in_thinking)
    for f in FORMATS.values():
        if (f.summary_start or f.think_end) in text:
            return f.summary_in(text, starts_in_thinking=starts_in_thinking)
    opened = any(f.think_start in text for f in FORMATS.values() if not f.summary_start)
    return None if starts_in_thinking or opened else text


def chat_template(tokenizer) -> str:
    """The text of the tokenizer's chat template ("" when it has none).

    Of a set of named templates, the "default" one (what `apply_chat_template` renders without tools); a set
    without one is read as all its templates together.
    """
    t = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(t, dict):
        t = t.get("default") or "\n".join(str(v) for v in t.values())
    return t or ""


def _named_in(text: str) -> Format | None:
    """The first registered format one of whose `detect` strings `text` holds."""
    return next((f for f in FORMATS.values() if any(d in text for d in f.detect)), None)


def detect_format(tokenizer=None, text: str | None = None) -> Format:
    """Detect the format from the chat template first, then from the text; a clear error if neither tells."""
    found = _named_in(chat_template(tokenizer)) or (_named_in(text) if text else None)
    if found is not None:
        return found
    raise TraceError("cannot detect the trace format: no thinking markers in the chat template or the text; "
                     "pass fmt='think' or 'harmony', or markers=(start, end)")


def get_format(fmt: str | Format | None = "auto", tokenizer=None, text: str | None = None,
               markers: tuple[str, str] | None = None) -> Format:
    """The one resolver of trace formats: `fmt` ("auto" or None, a registered name such as "think" or
    "harmony", "markers", or a Format).

    "auto" with `markers` is the markers format. Otherwise "auto" asks the chat template, then `text`. When
    neither tells and there is no text, the format is the one to generate in with this tokenizer: the first
    registered format one of whose `detect` strings is a token of the vocabulary (harmony when it holds
    "<|channel|>"), else think (a plain chat model: the prompt asks it to think first and close its thinking
    with </think>). A text that neither the template nor its own markers explain is an error.
    """
    if isinstance(fmt, Format):
        return fmt
    fmt = "auto" if fmt is None else fmt
    if markers is not None:
        if fmt not in ("auto", "markers"):
            raise TraceError(f"markers were given but fmt is {fmt!r}; use fmt='markers'")
        return markers_format(*markers)
    if fmt == "auto":
        try:
            return detect_format(tokenizer, text)
        except TraceError:
            if text is not None or tokenizer is None:
                raise
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return next((f for f in FORMATS.values() if any(d in vocab for d in f.detect)), THINK)
    if fmt == "markers":
        raise TraceError("fmt='markers' needs markers=(start, end)")
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r}; use auto, {', '.join(FORMATS)} or markers")
    return FORMATS[fmt]


def template_has_assistant_start(fmt: Format, tokenizer) -> bool:
    """Whether the chat template writes one of the format's assistant-turn openers (then the segmenter waits
    for it before looking for the start marker)."""
    template = chat_template(tokenizer)
    return any(a in template for a in fmt.assistant_start)
