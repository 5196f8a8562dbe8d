"""Trace and Step: a token sequence with its question/thinking/summary segments and steps; JSON in and out."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import TraceError
from .formats import Format, get_format
from .io import QUESTION_KEYS, atomic_write_text, read_jsonl, read_text_file
from .segment import KINDS, Segmenter, Step
from .tokens import token_bytes

__all__ = ["Trace", "Step", "load_traces", "record_fields"]

JSON_VERSION = 1


@dataclass
class Trace:
    """The exact token sequence a model saw and wrote, split into segments and steps.

    `segments[kind] = (start, end)`: token ranges (end exclusive) of "question", "thinking" and "summary"; they
    tile [0, T) in that order and may be empty. `steps` tile [0, T) too, each inside one segment.
    `token_char_ends[t]` is the character offset in `text` where token t ends (a character belongs to the token
    holding its last byte).
    """

    token_ids: list[int]
    text: str
    fmt: str
    segments: dict[str, tuple[int, int]]
    steps: list[Step]
    token_char_ends: list[int]
    meta: dict = field(default_factory=dict)
    format: Format | None = None

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_ids(cls, tokenizer, ids: Sequence[int], fmt: str | Format = "auto",
                 markers: tuple[str, str] | None = None, meta: dict | None = None,
                 split_question: bool = False) -> Trace:
        """Segment an exact token sequence (prompt and response together)."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if not ids:
            raise TraceError("the token sequence is empty")
        tb = token_bytes(tokenizer)
        if isinstance(fmt, str) and fmt == "auto" and markers is None:
            probe = b"".join(tb(i) for i in ids).decode("utf-8", errors="replace")
            fmt_obj = get_format("auto", tokenizer, text=probe)
        else:
            fmt_obj = get_format(fmt, tokenizer, markers=markers)
        seg = Segmenter(tokenizer, fmt_obj, split_question=split_question, tokbytes=tb)
        seg.feed(ids)
        seg.finish()
        return cls._from_segmenter(seg, ids, meta or {})

    @classmethod
    def _from_segmenter(cls, seg: Segmenter, ids: list[int], meta: dict) -> Trace:
        T = len(ids)
        th = seg.boundaries["thinking"]
        su = seg.boundaries["summary"]
        q_end = T if th is None else th
        t_end = T if su is None else su
        segments = {"question": (0, q_end), "thinking": (q_end, t_end), "summary": (t_end, T)}
        meta = dict(meta)
        notes = list(meta.get("notes", []))
        if th is None:
            notes.append("no thinking start marker: the whole trace is question")
        elif su is None:
            notes.append("the thinking never closed: the summary is empty")
        if notes:
            meta["notes"] = notes
        meta["thinking_closed"] = su is not None
        return cls(list(ids), seg.text, seg.fmt.name, segments, list(seg.steps), list(seg.token_char_ends),
                   meta, seg.fmt)

    @classmethod
    def from_text(cls, tokenizer, question: str, response: str, fmt: str | Format = "auto",
                  markers: tuple[str, str] | None = None, system: str | None = None, meta: dict | None = None,
                  strict: bool = True, split_question: bool = False) -> Trace:
        """Rebuild the exact token sequence: chat template with the question, then the response's tokens.

        The R1-distill and QwQ templates end the generation prompt with "<think>\\n", so their decoded responses
        start inside the thinking. When neither the prompt nor the response opens the thinking but the response
        closes it, the start marker and a newline are put in front of the response (meta "inserted_start_marker").
        With `strict`, a response whose tokens do not decode back to exactly the same text is an error.
        """
        if not isinstance(response, str) or not response.strip():
            raise TraceError("the response is empty")
        if not isinstance(question, str):
            raise TraceError("the question must be a string")
        for name, s in (("question", question), ("response", response)):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TraceError(f"the {name} is not valid Unicode (character {e.start}: "
                                 f"{s[e.start]!r})") from None
        fmt_obj = get_format(fmt, tokenizer, text=response, markers=markers)
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": question}]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = (system + "\n\n" if system else "") + question + "\n"
        meta = dict(meta or {})
        meta.setdefault("question", question)
        if question.strip() and question.strip() not in prompt:
            meta.setdefault("notes", []).append("the chat template altered the question text")
        if fmt_obj.think_start not in response and not prompt.rstrip().endswith(fmt_obj.think_start) \
                and fmt_obj.think_end in response:
            response = fmt_obj.think_start + "\n" + response
            meta["inserted_start_marker"] = True
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise TraceError("the response tokenizes to nothing")
        tb = token_bytes(tokenizer)
        if strict:
            got = b"".join(tb(i) for i in response_ids).decode("utf-8", errors="replace")
            if got != response:
                k = next((i for i, (x, y) in enumerate(zip(got, response)) if x != y), min(len(got), len(response)))
                raise TraceError(f"the tokenizer cannot reproduce the response text exactly (first difference at "
                                 f"character {k}: {response[k:k + 20]!r} became {got[k:k + 20]!r})")
        meta["prompt_tokens"] = len(prompt_ids)
        trace = cls.from_ids(tokenizer, prompt_ids + response_ids, fmt_obj, meta=meta, split_question=split_question)
        q_end = trace.segments["question"][1]
        q_pos = prompt.rfind(question)
        if q_end < len(trace) and q_pos >= 0 and trace.token_char_ends[q_end - 1] < q_pos + len(question):
            raise TraceError("the thinking start marker was found inside the prompt before the assistant's turn; "
                             "pass markers=(start, end) that the question does not contain")
        return trace

    # -- views --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]

    @property
    def id(self) -> str | None:
        v = self.meta.get("id")
        return None if v is None else str(v)

    def step_ids(self) -> np.ndarray:
        """The step index of every token: int64 [T]."""
        out = np.empty(len(self.token_ids), dtype=np.int64)
        for s in self.steps:
            out[s.token_start:s.token_end] = s.index
        return out

    def steps_of(self, kind: str) -> list[Step]:
        return [s for s in self.steps if s.kind == kind]

    def segment_text(self, kind: str) -> str:
        a, b = self.segments[kind]
        if a >= b:
            return ""
        ca = self.token_char_ends[a - 1] if a > 0 else 0
        return self.text[ca:self.token_char_ends[b - 1]]

    @property
    def thinking_closed(self) -> bool:
        return bool(self.meta.get("thinking_closed", self.segments["summary"][0] < len(self.token_ids)))

    def table(self, width: int = 60) -> str:
        """A readable table of the steps: index, kind, tokens, first words."""
        rows = [f"{'#':>4}  {'kind':<9} {'tokens':>11}  text"]
        for s in self.steps:
            words = " ".join(s.text.split())
            if len(words) > width:
                words = words[:width - 1] + "…"
            rows.append(f"{s.index:>4}  {s.kind:<9} {s.token_start:>5}-{s.token_end:<5}  {words}")
        counts = {k: len(self.steps_of(k)) for k in KINDS}
        rows.append(f"{len(self.token_ids)} tokens, {self.num_steps} steps (question {counts['question']}, "
                    f"thinking {counts['thinking']}, summary {counts['summary']}), format {self.fmt}")
        return "\n".join(rows)

    # -- JSON ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "stepscope_trace": JSON_VERSION,
            "fmt": self.fmt,
            "format": self.format.to_json() if self.format else None,
            "token_ids": self.token_ids,
            "text": self.text,
            "segments": {k: list(v) for k, v in self.segments.items()},
            "steps": [s.to_json() for s in self.steps],
            "token_char_ends": self.token_char_ends,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> Trace:
        if not isinstance(d, dict) or "stepscope_trace" not in d:
            raise TraceError("not a stepscope trace (no 'stepscope_trace' key)")
        if d["stepscope_trace"] > JSON_VERSION:
            raise TraceError(f"trace JSON version {d['stepscope_trace']} is newer than this stepscope")
        try:
            fmt_obj = Format.from_json(d["format"]) if d.get("format") else None
            trace = cls(list(d["token_ids"]), d["text"], d["fmt"],
                        {k: (int(v[0]), int(v[1])) for k, v in d["segments"].items()},
                        [Step.from_json(s) for s in d["steps"]], list(d["token_char_ends"]),
                        dict(d.get("meta", {})), fmt_obj)
        except KeyError as e:
            raise TraceError(f"malformed trace JSON (no field {e.args[0]!r})") from None
        except (TypeError, IndexError, ValueError) as e:
            raise TraceError(f"malformed trace JSON ({type(e).__name__}: {e})") from None
        trace.validate()
        return trace

    def validate(self) -> None:
        """Check the invariants: steps and segments tile the tokens, texts concatenate to the trace text."""
        T = len(self.token_ids)
        if sorted(self.segments) != sorted(KINDS):
            raise TraceError(f"segments: has {', '.join(map(repr, self.segments))}; expected {', '.join(KINDS)}")
        for i, s in enumerate(self.steps):
            if s.kind not in KINDS:
                raise TraceError(f"steps[{i}].kind: {s.kind!r} is not one of {', '.join(KINDS)}")
        if len(self.token_char_ends) != T:
            raise TraceError("token_char_ends does not match the number of tokens")
        pos = 0
        for kind in KINDS:
            a, b = self.segments[kind]
            if a != pos or b < a:
                raise TraceError(f"segment {kind} {a}-{b} does not follow on from token {pos}")
            pos = b
        if pos != T:
            raise TraceError("the segments do not cover every token")
        pos = 0
        for i, s in enumerate(self.steps):
            if s.index != i or s.token_start != pos or s.token_end <= s.token_start:
                raise TraceError(f"step {i} ({s.token_start}-{s.token_end}) does not follow on from token {pos}")
            a, b = self.segments[s.kind]
            if not (a <= s.token_start and s.token_end <= b):
                raise TraceError(f"step {i} crosses its {s.kind} segment")
            pos = s.token_end
        if pos != T:
            raise TraceError("the steps do not cover every token")
        if "".join(s.text for s in self.steps) != self.text:
            raise TraceError("the step texts do not concatenate to the trace text")

    def check_tokens(self, tokenizer) -> None:
        """Check that the token ids spell the text with this tokenizer, token by token.

        A hand-edited id (or text, or a trace of another tokenizer) is an error naming the first token where the
        ids and the text part."""
        tb = token_bytes(tokenizer)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the segmenter decodes
        pos, last = 0, len(self.token_ids) - 1
        for t, tid in enumerate(self.token_ids):
            try:
                chars = decoder.decode(tb(int(tid)), final=t == last)
            except (ValueError, IndexError, KeyError, TypeError, OverflowError):
                raise TraceError(f"token_ids[{t}]: id {tid!r} is not in the tokenizer's vocabulary") from None
            end = pos + len(chars)
            if self.text[pos:end] != chars or self.token_char_ends[t] != end:
                shown = self.text[pos:max(self.token_char_ends[t], pos + 1)][:40]
                raise TraceError(f"token_ids[{t}]: id {tid} spells {chars!r} but the text has {shown!r} there: the "
                                 "token ids and the text disagree "
                                 "(edited by hand, or written with another tokenizer)")
            pos = end
        if pos != len(self.text):
            raise TraceError(f"text: {len(self.text) - pos} characters after the last token's")

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer=None) -> Trace:
        """Read a trace JSON file; with `tokenizer`, also check that its ids spell its text. Errors name the file."""
        text = read_text_file(path)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return _from_json_at(d, str(path), tokenizer)


def _from_json_at(d: dict, where: str, tokenizer=None) -> Trace:
    """Trace.from_json (then check_tokens with a tokenizer), with errors that say where the JSON came from."""
    try:
        trace = Trace.from_json(d)
        if tokenizer is not None:
            trace.check_tokens(tokenizer)
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None
    return trace


# -- reading the files people have ----------------------------------------------------------------------------

RESPONSE_KEYS = ("response", "output", "completion", "generation", "model_output", "text", "answer_text")


def record_fields(rec: dict) -> tuple[str, str]:
    """(question, response) of a record written by a common evaluation tool.

    Knows flat records (question/problem/prompt + response/output/completion/generation), lm-eval-harness
    samples (`doc` + `resps`/`filtered_resps`) and chat records (`messages` with user and assistant turns).
    """
    q, r, _ = _record_fields(rec)
    return q, r


def _record_fields(rec: dict) -> tuple[str, str, str]:
    """(question, response, the field the response came from) of a record (see `record_fields`)."""
    if "messages" in rec and isinstance(rec["messages"], list):
        users = [m.get("content", "") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        bots = [m.get("content", "") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
        if users and bots:
            return users[-1], bots[-1], "messages"
    doc = rec.get("doc") if isinstance(rec.get("doc"), dict) else None
    q = next((rec[k] for k in QUESTION_KEYS if isinstance(rec.get(k), str)), None)
    if q is None and doc:
        q = next((doc[k] for k in QUESTION_KEYS if isinstance(doc.get(k), str)), None)
    key = next((k for k in RESPONSE_KEYS if isinstance(rec.get(k), str)), None)
    r = None if key is None else rec[key]
    if r is None:
        for k in ("filtered_resps", "resps"):
            v = rec.get(k)
            while isinstance(v, list) and v:
                v = v[0]
            if isinstance(v, str):
                r, key = v, k
                break
    if q is None or r is None:
        missing = "question field (" + "/".join(QUESTION_KEYS) + ")" if q is None else \
            "response field (" + _RESPONSE_FIELDS + ")"
        raise TraceError(f"the record has no {missing}; its keys: {', '.join(sorted(rec))}")
    return q, r, key


_RESPONSE_FIELDS = "/".join(RESPONSE_KEYS) + ", lm-eval's resps/filtered_resps, or chat messages"


def _trace_of_record(rec: dict, tokenizer, *, fmt, markers, strict: bool, meta: dict) -> Trace:
    """The trace of one record: its question and response rebuilt through the chat template. A response with
    no thinking at all (an all-question trace) is an error: its field is most likely not the response."""
    q, r, key = _record_fields(rec)
    meta = {**{k: v for k, v in rec.items() if k not in RESPONSE_KEYS and k not in ("messages", "resps",
                                                                                  "filtered_resps")}, **meta}
    trace = Trace.from_text(tokenizer, question=q, response=r, fmt=fmt, markers=markers, meta=meta, strict=strict)
    if trace.segments["question"][1] == len(trace):
        raise TraceError(f"the response (field {key!r}) holds no thinking, so the trace would be all question; "
                         f"is the response under another name? Accepted response fields: {_RESPONSE_FIELDS}; "
                         f"the record's keys: {', '.join(sorted(rec))}")
    return trace


def load_traces(path: str | os.PathLike, tokenizer=None, index: int | None = None, fmt: str | Format = "auto",
                markers: tuple[str, str] | None = None, question: str | None = None,
                strict: bool = True) -> list[Trace]:
    """Read traces from a trace JSON file, a JSONL file of records, or a plain text file.

    - trace JSON (written by Trace.save): loaded as is, no tokenizer needed; with one, its ids are checked to
      spell its text (`Trace.check_tokens`).
    - JSONL (or a JSON list) of records with question/response fields: rebuilt with Trace.from_text;
      `index` picks one record (0-based), else all.
    - plain text: the whole trace as the model saw it (prompt, markers and response), tokenized as is;
      with `question`, the text is the response to that question instead.
    """
    path = Path(path)
    text = read_text_file(path)
    stripped = text.lstrip()
    records: list[dict] | None = None
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None  # maybe JSONL
        if isinstance(obj, dict) and "stepscope_trace" in obj:
            return [_from_json_at(obj, str(path), tokenizer)]
        if isinstance(obj, dict):
            records = [obj]
        elif isinstance(obj, list):
            records = obj
        else:
            records = read_jsonl(path)
    if records is not None:
        if index is not None:
            if not -len(records) <= index < len(records):
                raise TraceError(f"{path}: index {index} is out of range ({len(records)} records)")
            picked = [(index % len(records), records[index])]
        else:
            picked = list(enumerate(records))
        out = []
        for i, rec in picked:
            if not isinstance(rec, dict):
                raise TraceError(f"{path}: record {i} is not a JSON object")
            if "stepscope_trace" in rec:
                out.append(_from_json_at(rec, f"{path}: record {i}", tokenizer))
                continue
            if "trace" in rec and isinstance(rec["trace"], dict) and "stepscope_trace" in rec["trace"]:
                out.append(_from_json_at(rec["trace"], f"{path}: record {i}: trace", tokenizer))
                continue
            if tokenizer is None:
                raise TraceError(f"{path}: records need a tokenizer (--model) to be tokenized")
            try:
                out.append(_trace_of_record(rec, tokenizer, fmt=fmt, markers=markers, strict=strict,
                                            meta={"id": rec.get("id", f"{path.stem}-{i}"), "source_file": str(path),
                                                  "source_index": i}))
            except TraceError as e:
                raise TraceError(f"{path}: record {i}: {e}") from None
        return out
    if tokenizer is None:
        raise TraceError(f"{path}: plain text needs a tokenizer (--model) to be tokenized")
    if not text.strip():
        raise TraceError(f"{path}: the file is empty")
    meta = {"id": path.stem, "source_file": str(path)}
    if question is not None:
        return [Trace.from_text(tokenizer, question=question, response=text, fmt=fmt, markers=markers, meta=meta,
                                strict=strict)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [Trace.from_ids(tokenizer, ids, fmt=fmt, markers=markers, meta=meta)]
