"""The segmenter: online equals offline, exact token spans, character offsets, against a slow reference."""

import random
import re

import pytest
from conftest import shared_trace_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepscope.segment import Segmenter, is_weak_piece
from stepscope.trace import Trace


def reference_steps(text, char_ends, segments):
    """Slow, obvious re-derivation of METHOD.md §2 on the whole text with regular expressions.

    Returns [(kind, token_start, token_end)]. Cuts are found on each segment's text; a cut's step ends at the
    token holding the cut character; weak pieces join the next piece.
    """
    def tok_of(c):  # the token holding character c: the first token whose end is beyond c
        return next(t for t, e in enumerate(char_ends) if e > c)

    out = []
    for kind in ("question", "thinking", "summary"):
        a, b = segments[kind]
        if a >= b:
            continue
        ca = char_ends[a - 1] if a > 0 else 0
        cb = char_ends[b - 1]
        seg = text[ca:cb]
        cuts = set()
        if kind == "thinking":
            cuts |= {m.start() for m in re.finditer(r"[.!?](?=\s)", seg)}
        if kind != "question":
            for m in re.finditer(r"\n[^\S\n]*\n", seg):
                before = seg[:m.start()].rstrip()
                if before:
                    cuts.add(len(before) - 1)
        min_chars = 10 if kind == "summary" else 15
        start_tok, piece_start = a, 0
        for c in sorted(cuts):
            piece = seg[piece_start:c + 1]
            piece_start = c + 1
            end_tok = tok_of(ca + c) + 1
            if end_tok <= start_tok or is_weak_piece(piece, min_chars):
                continue
            out.append((kind, start_tok, end_tok))
            start_tok = end_tok
        if start_tok < b:
            out.append((kind, start_tok, b))
    return out


def spans(steps):
    return [(s.kind, s.token_start, s.token_end, s.char_start, s.char_end, s.text, s.closed_at) for s in steps]


def run_chunks(tok, ids, chunks, fmt="think"):
    seg = Segmenter(tok, fmt)
    got = []
    i = 0
    for n in chunks:
        got += seg.feed(ids[i:i + n])
        i += n
    got += seg.feed(ids[i:])
    got += seg.finish()
    return seg, got


ALPHABET = st.sampled_from(list("abc xyz..!?  \n\n\t12345,;|-é中😀") + [". ", ".\n\n", "3.14", " Wait.", "\n\n",
                                                                  "| a | b |", "<think>", "</think>", "|---|"])
TEXTS = st.lists(ALPHABET, min_size=0, max_size=60).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thinking=TEXTS, summary=TEXTS, chunk_seed=st.integers(0, 10_000))
def test_online_equals_offline_and_reference(think_tokenizer, thinking, summary, chunk_seed):
    tok = think_tokenizer
    text = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\n" + thinking + "</think>" + summary
    ids = tok(text, add_special_tokens=False)["input_ids"]
    offline, whole = run_chunks(tok, ids, [])
    _, one = run_chunks(tok, ids, [1] * len(ids))
    rng = random.Random(chunk_seed)
    _, chunked = run_chunks(tok, ids, [rng.randint(1, 7) for _ in range(len(ids))])
    assert spans(whole) == spans(one) == spans(chunked)
    trace = Trace.from_ids(tok, ids, fmt="think")
    trace.validate()  # tiling, segments, texts concatenate
    assert spans(trace.steps) == spans(whole)
    assert trace.text == text  # byte-level BPE round trip
    assert [(s.kind, s.token_start, s.token_end) for s in trace.steps] == \
        reference_steps(trace.text, trace.token_char_ends, trace.segments)
    for s in trace.steps:
        assert trace.text[s.char_start:s.char_end] == s.text
        assert s.closed_at >= s.token_end - 1


def test_char_offsets_follow_the_byte_holding_token(think_tokenizer):
    tok = think_tokenizer
    text = "<think>\n中文 😀 naïve. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 is fun!\n\nÅngström.</think>ok 🎉"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tb = [tok.convert_ids_to_tokens(i) for i in ids]
    assert any(len(p) == 1 and ord(p) > 127 for p in tb) or len(ids) > len(text) // 2  # bytes are split somewhere
    from stepscope.tokens import token_bytes

    raw = [token_bytes(tok)(i) for i in ids]
    trace = Trace.from_ids(tok, ids, fmt="think")
    for t in range(len(ids)):
        # independent: the complete characters in the bytes of tokens 0..t
        expect = len(b"".join(raw[:t + 1]).decode("utf-8", errors="ignore"))
        assert trace.token_char_ends[t] == expect
    assert trace.text == text


def test_period_between_digits_and_weak_pieces(think_tokenizer):
    tok = think_tokenizer
    resp = ("The value is 3.14159 and that matters a lot. Wait. Let me recompute it carefully now.\n\n"
            "42.\n\nSo the final value stays the same as before.\n</think>\n\nAnswer: 3.14\n\nDone, yes.")
    trace = Trace.from_text(tok, question="Q", response=resp)
    think = [s.text for s in trace.steps_of("thinking")]
    assert think[0] == "\nThe value is 3.14159 and that matters a lot."  # the "\n" after <think> is its own token
    assert think[1] == " Wait. Let me recompute it carefully now."  # "Wait." is short: joins the next
    assert think[2] == "\n\n42.\n\nSo the final value stays the same as before."  # bare number joins too
    assert think[3] == "\n</think>"
    summ = [s.text for s in trace.steps_of("summary")]
    assert summ == ["\n\nAnswer: 3.14", "\n\nDone, yes."]


def test_every_shared_trace(traces_available, chatml_tokenizer):
    recs = shared_trace_records()
    assert len(recs) == 46
    for rec in recs:
        tr = Trace.from_text(chatml_tokenizer, question=rec["problem"], response=rec["response"],
                             meta={"id": rec["id"]})
        tr.validate()
        assert "".join(s.text for s in tr.steps) == tr.text
        assert tr.thinking_closed and len(tr.steps_of("thinking")) >= 2 and tr.steps_of("summary")
        assert [(s.kind, s.token_start, s.token_end) for s in tr.steps] == \
            reference_steps(tr.text, tr.token_char_ends, tr.segments)
        # online, one token at a time, gives the same steps
        _, one = run_chunks(chatml_tokenizer, tr.token_ids, [1] * len(tr))
        assert spans(one) == spans(tr.steps)


@pytest.mark.parametrize("n", [2000, 8000])
def test_linear_time(think_tokenizer, n):
    import time

    tok = think_tokenizer
    sent = "We add the two numbers and carry the one. "
    ids = tok("<think>\n" + sent * (n // 10), add_special_tokens=False)["input_ids"]
    seg = Segmenter(tok, "think", require_assistant=False)
    t0 = time.perf_counter()
    for i in ids:
        seg.feed((i,))
    per_token = (time.perf_counter() - t0) / len(ids)
    assert per_token < 200e-6, f"{per_token * 1e6:.1f} us per token"
    assert len(seg.steps) >= n // 10 - 1


class CharByChar(Segmenter):
    """The segmenter without its bulk paths, as a reference: every character of every token goes through
    _scan_char (cuts) and then through a marker match of the whole tail, one by one."""

    def _feed_one(self, tid, closed):
        t = self.num_tokens
        chars = self._decoder.decode(self.tokbytes(tid))
        self.num_tokens += 1
        self._token_texts.append(chars)
        self.token_char_ends.append(self.num_chars + len(chars))
        transition = None
        for ch in chars:
            pos = self.num_chars
            self.num_chars += 1
            if transition is None:
                if self.segment != "question" or self.split_question:
                    self._scan_char(ch, pos, t, closed)
                self._piece_buf.append(ch)
                transition = self._match_char(ch)
            else:
                self._piece_buf.append(ch)
        if transition is not None:
            self._enter(transition, t, closed)

    def _match_char(self, ch):
        self._tail = (self._tail + ch)[-self._max_marker:]
        f = self.fmt
        if self.segment == "question":
            if not self._armed:
                if any(self._tail.endswith(a) for a in f.assistant_start):
                    self._armed = True
                return None
            if self._tail.endswith(f.think_start):
                return "thinking"
            if f.summary_start and self._tail.endswith(f.summary_start):
                return "summary"
        elif self.segment == "thinking" and self._tail.endswith(f.think_end):
            return "summary"
        return None


def test_space_class_is_str_isspace():
    import sys

    from stepscope.segment import _TRAILING_NONSPACE

    def trailing_start(s):  # where the run of non-space characters at the end begins
        return _TRAILING_NONSPACE.search(s).start()

    assert [c for c in range(sys.maxunicode + 1) if trailing_start("a" + chr(c)) != (2 if chr(c).isspace() else 0)] == []


def _state(seg):
    return (seg.segment, dict(seg.boundaries), seg.num_tokens, seg.num_chars, seg._tail, "".join(seg._piece_buf),
            seg._piece_start, seg._prev_char, seg._prev_tok, seg._nl_run, seg._last_ns_pos, seg._last_ns_tok,
            seg._armed, seg._step_start)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(thinking=TEXTS, summary=TEXTS, split=st.booleans())
def test_bulk_path_equals_char_by_char(chatml_tokenizer, thinking, summary, split):
    """Token by token, the segmenter's bulk path leaves exactly the state the character loop leaves."""
    tok = chatml_tokenizer
    text = ("<|im_start|>user\nQ. Yes?\n\nok<|im_end|>\n<|im_start|>assistant\n<think>\n" + thinking + "</think>"
            + summary)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    fast, slow = Segmenter(tok, "think", split_question=split), CharByChar(tok, "think", split_question=split)
    for i in ids:
        assert spans(fast.feed((i,))) == spans(slow.feed((i,)))
        assert _state(fast) == _state(slow)
    assert spans(fast.finish()) == spans(slow.finish())


def test_bulk_path_on_shared_traces(traces_available, chatml_tokenizer):
    for rec in shared_trace_records()[:12]:
        tr = Trace.from_text(chatml_tokenizer, question=rec["problem"], response=rec["response"])
        _, fast = run_chunks(chatml_tokenizer, tr.token_ids, [1] * len(tr))
        slow = CharByChar(chatml_tokenizer, "think")
        got = [s for i in tr.token_ids for s in slow.feed((i,))] + slow.finish()
        assert spans(fast) == spans(got) == spans(tr.steps)
