"""The one step segmenter (docs/method.md §2): incremental, token-exact, identical offline and online.

Fed token ids one at a time or all at once, it turns them into text with an incremental UTF-8 decoder, finds
the segment markers and the step cuts, and returns steps as spans of whole tokens. Work per token is O(1)
amortized: every character is looked at a bounded number of times.

Rules (docs/method.md §2, with the decisions marked "ours" there):
- A character belongs to the token that holds its last byte (byte-level BPE may split a character).
- Thinking: a cut follows `.`, `!` or `?` when the next character is white space, and the last non-space
  character before a blank line. Summary: blank lines only. The question is one step (or split like thinking
  with `split_question=True`).
- The piece between two cuts is "weak" when its stripped text is shorter than `min_chars` (15 in thinking, 10
  in the summary), a bare number, or a markdown table row or separator. A weak piece does not end a step: it
  joins the step that follows. The last piece of a segment always ends a step (nothing follows it).
- The token holding a cut's character ends the step; the following token begins the next one. Marker tokens
  belong to the segment they close.
- `Step.closed_at` is the token whose arrival confirmed the cut. It is usually the first token of the next step;
  when the confirming character sits in a later token (a blank line split over two "\\n" tokens) it is later,
  and StepFlow's momentum injection fires there: max(next.token_start, prev.closed_at).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import asdict, dataclass

from .formats import Format, get_format, template_has_assistant_start
from .tokens import TokenBytes, token_bytes

KINDS = ("question", "thinking", "summary")
_BARE_NUMBER = re.compile(r"^[-+(]?[$€£]?\d[\d,.\s]*[.):%]?$")
_TABLE_ROW = re.compile(r"^\|.*\|$|^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$", re.S)
# the run of non-space characters at the end of a string (\S is exactly "not str.isspace()": tested over all
# code points)
_TRAILING_NONSPACE = re.compile(r"\S*\Z")


@dataclass
class Step:
    """One step: a span of whole tokens [token_start, token_end) inside one segment, with its exact text.

    `kind` is "question", "thinking" or "summary"; `index` its position in the trace; `char_start/char_end`
    its span in the trace text; `closed_at` the token whose arrival confirmed the step's end.
    """

    kind: str
    index: int
    token_start: int
    token_end: int  # exclusive
    char_start: int
    char_end: int  # exclusive
    text: str
    closed_at: int = -1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Step:
        return cls(**{k: d[k] for k in ("kind", "index", "token_start", "token_end", "char_start", "char_end",
                                        "text")}, closed_at=d.get("closed_at", -1))

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def is_weak_piece(piece: str, min_chars: int) -> bool:
    """A piece too small to be a step of its own: short, a bare number, or a markdown table row."""
    s = piece.strip()
    return len(s) < min_chars or bool(_BARE_NUMBER.match(s)) or bool(_TABLE_ROW.match(s))


class Segmenter:
    """Incremental segmenter. `feed(ids)` returns the steps that closed; `finish()` closes the last one.

    Attributes read by StepFlow while generating: `segment` (the segment of the next token to be fed),
    `boundaries` (token index where thinking and summary begin, None until known), `num_tokens`.
    """

    def __init__(self, tokenizer=None, fmt: str | Format = "think", markers: tuple[str, str] | None = None,
                 *, split_question: bool = False, min_chars_thinking: int = 15, min_chars_summary: int = 10,
                 require_assistant: bool | None = None, tokbytes: TokenBytes | None = None):
        self.fmt = get_format(fmt, tokenizer, markers=markers)
        self.tokbytes = tokbytes or token_bytes(tokenizer)
        self.split_question = split_question
        self.min_chars = {"question": min_chars_thinking, "thinking": min_chars_thinking,
                          "summary": min_chars_summary}
        if require_assistant is None:
            require_assistant = tokenizer is not None and template_has_assistant_start(self.fmt, tokenizer)
        self._armed = not require_assistant  # start marker only counts after the assistant opener
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.segment = "question"
        self.boundaries: dict[str, int | None] = {"thinking": None, "summary": None}
        self.num_tokens = 0
        self.num_chars = 0
        self.steps: list[Step] = []
        self.token_char_ends: list[int] = []
        self._token_texts: list[str] = []
        self._tail = ""  # the last characters, for marker matching
        self._max_marker = max(len(m) for m in self._markers_all())
        # the last characters of the markers: a token without any of them cannot complete one
        self._marker_end = re.compile("[" + re.escape("".join(sorted({m[-1] for m in self._markers_all()}))) + "]")
        self._reset_piece(step_start=0, char_pos=0)

    # -- state ------------------------------------------------------------------------------------------------

    def _markers_all(self) -> list[str]:
        f = self.fmt
        return [m for m in (f.think_start, f.think_end, f.summary_start, *f.assistant_start) if m]

    def _reset_piece(self, step_start: int, char_pos: int) -> None:
        self._step_start = step_start  # first token of the open step
        self._piece_start = char_pos  # first char of the open piece
        self._piece_buf: list[str] = []  # chars of the open piece
        self._prev_char = ""
        self._prev_tok = -1
        self._nl_run = 0  # newlines in the current run of white space
        self._last_ns_pos = -1  # last non-space char and its token
        self._last_ns_tok = -1

    @property
    def text(self) -> str:
        return "".join(self._token_texts)

    # -- feeding ------------------------------------------------------------------------------------------

    def feed(self, token_ids) -> list[Step]:
        """Feed token ids (any iterable of ints); return the steps that closed."""
        closed: list[Step] = []
        for tid in token_ids:
            self._feed_one(int(tid), closed)
        return closed

    def _feed_one(self, tid: int, closed: list[Step]) -> None:
        t = self.num_tokens
        chars = self._decoder.decode(self.tokbytes(tid))
        self.num_tokens += 1
        self._token_texts.append(chars)
        start = self.num_chars
        self.token_char_ends.append(start + len(chars))
        if not chars:
            return
        # What a character loop (scan for cuts, then match markers, char by char) finds, in bulk:
        # - a marker can only end at one of the markers' last characters, so the tail is matched there alone;
        #   the first marker completed ends this token's scan for cuts (the token closes the segment), while
        #   matching goes on over the rest of the token: a marker begun there opens its segment too;
        # - cuts happen only at white space: the characters up to the token's last white space go one by one
        #   (usually a leading space), the run of non-space characters after it only moves "the last character".
        n = len(chars)  # the characters of the current segment: up to the end of the marker that closes it
        opened: list[str] = []  # the segments this token's markers open, in order
        segment = self.segment
        for m in self._marker_end.finditer(chars):
            if segment == "summary":
                break
            i = m.start()
            new = self._match_tail((self._tail + chars[:i + 1])[-self._max_marker:], segment)
            if new is not None:
                if not opened:
                    n = i + 1
                opened.append(new)
                segment = new
        self._tail = (self._tail + chars)[-self._max_marker:]
        self.num_chars = start + len(chars)
        if self.segment != "question" or self.split_question:
            scanned = chars if n == len(chars) else chars[:n]
            k = _TRAILING_NONSPACE.search(scanned).start()
            for i in range(k):
                self._scan_char(chars[i], start + i, t, closed)
                self._piece_buf.append(chars[i])
            if k < n:
                self._nl_run = 0
                self._last_ns_pos, self._last_ns_tok = start + n - 1, t
                self._prev_char, self._prev_tok = chars[n - 1], t
            self._piece_buf.extend(chars[k:])
        else:
            self._piece_buf.extend(chars)
        for segment in opened:
            self._enter(segment, t, closed)

    def _enter(self, segment: str, t: int, closed: list[Step]) -> None:
        """Token t completed the marker that opens `segment`: close the current piece, start the new segment
        at token t + 1."""
        self._close(t + 1, closed_at=t, closed=closed)
        self.segment = segment
        self.boundaries[segment] = t + 1
        if segment == "summary" and self.boundaries["thinking"] is None:
            self.boundaries["thinking"] = t + 1  # empty thinking
        self._reset_piece(step_start=t + 1, char_pos=self.num_chars)

    def _match_tail(self, tail: str, segment: str) -> str | None:
        """The segment a marker ending `tail` (the last characters fed, in `segment`) opens, if any; arms the
        start marker when `tail` ends with the assistant opener."""
        f = self.fmt
        if segment == "question":
            if not self._armed:
                if any(tail.endswith(a) for a in f.assistant_start):
                    self._armed = True
                return None
            if tail.endswith(f.think_start):
                return "thinking"
            if f.summary_start and tail.endswith(f.summary_start):
                return "summary"
        elif segment == "thinking" and tail.endswith(f.think_end):
            return "summary"
        return None

    def _scan_char(self, ch: str, pos: int, tok: int, closed: list[Step]) -> None:
        """Find cuts: sentence ends (not in the summary) and blank lines."""
        if ch.isspace():
            if self._prev_char and self._prev_char in ".!?" and self.segment != "summary":
                self._cut(pos - 1, self._prev_tok, tok, closed)
            if ch == "\n":
                self._nl_run += 1
                if self._nl_run == 2 and self._last_ns_pos >= 0:
                    self._cut(self._last_ns_pos, self._last_ns_tok, tok, closed)
        else:
            self._nl_run = 0
            self._last_ns_pos, self._last_ns_tok = pos, tok
        self._prev_char, self._prev_tok = ch, tok

    def _cut(self, cpos: int, ctok: int, tok: int, closed: list[Step]) -> None:
        """A cut after character `cpos` (held by token `ctok`), confirmed while feeding token `tok`."""
        if cpos < self._piece_start:
            return  # already cut here (". " followed by a blank line)
        n = cpos + 1 - self._piece_start
        piece = "".join(self._piece_buf[:n])
        del self._piece_buf[:n]
        self._piece_start = cpos + 1
        if ctok < self._step_start or is_weak_piece(piece, self.min_chars[self.segment]):
            return  # joins the step that follows
        self._close(ctok + 1, closed_at=tok, closed=closed)

    def _close(self, token_end: int, closed_at: int, closed: list[Step]) -> None:
        a = self._step_start
        if token_end <= a:
            return
        char_start = self.token_char_ends[a - 1] if a > 0 else 0
        char_end = self.token_char_ends[token_end - 1]
        step = Step(self.segment, len(self.steps), a, token_end, char_start, char_end,
                    "".join(self._token_texts[a:token_end]), closed_at)
        self.steps.append(step)
        closed.append(step)
        self._step_start = token_end

    def finish(self) -> list[Step]:
        """Flush the decoder and close the open step (end of sequence)."""
        closed: list[Step] = []
        rest = self._decoder.decode(b"", final=True)
        if rest and self._token_texts:
            self._token_texts[-1] += rest
            self.num_chars += len(rest)
            self.token_char_ends[-1] = self.num_chars
        self._close(self.num_tokens, closed_at=self.num_tokens - 1, closed=closed)
        return closed


def segment_ids(tokenizer, ids, fmt: str | Format = "think", **kwargs) -> Segmenter:
    """Run the segmenter over a whole sequence (offline use) and return it, finished."""
    seg = Segmenter(tokenizer, fmt, **kwargs)
    seg.feed(ids)
    seg.finish()
    return seg
