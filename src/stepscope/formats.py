"""Marker sets per model family, and detection of the format from a tokenizer's chat template or a text."""

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


def _template(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), "")
    return t or ""


def detect_format(tokenizer=None, text: str | None = None) -> Format:
    """Detect the format from the chat template first, then from the text; a clear error if neither tells."""
    template = _template(tokenizer)
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


def get_format(fmt: str | Format = "auto", tokenizer=None, text: str | None = None,
               markers: tuple[str, str] | None = None) -> Format:
    """Resolve `fmt` ("auto", "think", "harmony", "markers" or a Format) to a Format."""
    if isinstance(fmt, Format):
        return fmt
    if markers is not None:
        if fmt not in ("auto", "markers"):
            raise TraceError(f"markers were given but fmt is {fmt!r}; use fmt='markers'")
        return markers_format(*markers)
    if fmt == "auto":
        return detect_format(tokenizer, text)
    if fmt == "markers":
        raise TraceError("fmt='markers' needs markers=(start, end)")
    if fmt not in FORMATS:
        raise TraceError(f"unknown format {fmt!r}; use auto, think, harmony or markers")
    return FORMATS[fmt]


def template_has_assistant_start(fmt: Format, tokenizer) -> bool:
    """Whether the chat template writes one of the format's assistant-turn openers (then the segmenter waits
    for it before looking for the start marker)."""
    template = _template(tokenizer)
    return any(a in template for a in fmt.assistant_start)
