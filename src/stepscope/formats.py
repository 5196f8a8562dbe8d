"""Marker sets per model family, the one chat-template reader, and the one resolver of a trace's format."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import TraceError


@dataclass(frozen=True)
class Format:
    """How a trace marks its thinking.

    `think_start` ends the question segment, `think_end` ends the thinking segment; both are matched as text, so
    they work whether the tokenizer holds them as one special token or as several pieces. `assistant_start`
    lists strings that open the assistant's turn: when the chat template holds one of them, the start marker is
    only looked for after it, so a marker string quoted inside the question cannot open the thinking.
    `summary_start` (harmony) opens the summary straight from the question, for a model that skips thinking.
    """

    name: str
    think_start: str
    think_end: str
    assistant_start: tuple[str, ...] = ()
    summary_start: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "think_start": self.think_start, "think_end": self.think_end,
                "assistant_start": list(self.assistant_start), "summary_start": self.summary_start}

    @classmethod
    def from_json(cls, d: dict) -> Format:
        return cls(d["name"], d["think_start"], d["think_end"], tuple(d.get("assistant_start", ())),
                   d.get("summary_start"))


THINK = Format(
    "think", "<think>", "</think>",
    assistant_start=("<|im_start|>assistant", "<｜Assistant｜>", "<|assistant|>",
                     "<|start_header_id|>assistant<|end_header_id|>", "<start_of_turn>model"),
)
HARMONY = Format(
    "harmony", "<|channel|>analysis<|message|>", "<|end|>",
    assistant_start=("<|start|>assistant",), summary_start="<|channel|>final<|message|>",
)
FORMATS = {"think": THINK, "harmony": HARMONY}


def markers_format(start: str, end: str) -> Format:
    """A format for any other model: user-given start and end strings."""
    if not start or not end:
        raise TraceError("markers need a non-empty start and end string")
    if start == end:
        raise TraceError(f"the start and end markers must differ (both {start!r})")
    return Format("markers", start, end)


def chat_template(tokenizer) -> str:
    """The text of the tokenizer's chat template ("" when it has none).

    Of a set of named templates, the "default" one (what `apply_chat_template` renders without tools); a set
    without one is read as all its templates together.
    """
    t = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(t, dict):
        t = t.get("default") or "\n".join(str(v) for v in t.values())
    return t or ""


def detect_format(tokenizer=None, text: str | None = None) -> Format:
    """Detect the format from the chat template first, then from the text; a clear error if neither tells."""
    template = chat_template(tokenizer)
    if "<|channel|>" in template:
        return HARMONY
    if "<think>" in template or "</think>" in template:
        return THINK
    if text:
        if "<|channel|>" in text:
            return HARMONY
        if "</think>" in text or "<think>" in text:
            return THINK
    raise TraceError("cannot detect the trace format: no thinking markers in the chat template or the text; "
                     "pass fmt='think' or 'harmony', or markers=(start, end)")


def get_format(fmt: str | Format | None = "auto", tokenizer=None, text: str | None = None,
               markers: tuple[str, str] | None = None) -> Format:
    """The one resolver of trace formats: `fmt` ("auto" or None, "think", "harmony", "markers", or a Format).

    "auto" with `markers` is the markers format. Otherwise "auto" asks the chat template, then `text`. When
    neither tells and there is no text, the format is the one to generate in with this tokenizer: harmony when
    its vocabulary holds "<|channel|>", else think (a plain chat model: the prompt asks it to think first and
    close its thinking with </think>). A text that neither the template nor its own markers explain is an error.
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
        return HARMONY if "<|channel|>" in vocab else THINK
    if fmt == "markers":
        raise TraceError("fmt='markers' needs markers=(start, end)")
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r}; use auto, think, harmony or markers")
    return FORMATS[fmt]


def template_has_assistant_start(fmt: Format, tokenizer) -> bool:
    """Whether the chat template writes one of the format's assistant-turn openers (then the segmenter waits
    for it before looking for the start marker)."""
    template = chat_template(tokenizer)
    return any(a in template for a in fmt.assistant_start)
